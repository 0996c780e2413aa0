"""`rlhf-tui export-bundle`: each engine's files in its exact field names, loaded with the libraries here.

One labeled workspace with a finished reward run is trained per session, and a copy of it with a one-step
PPO run; exports only read a workspace, so tests share them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.cli import main
from rlhf.config import Workspace
from rlhf.store import Store

TINY_SETTINGS = """
[reward]
epochs = 1
batch_size = 4
heldout_fraction = 0.25
[ppo]
steps = 1
batch_size = 2
minibatches = 1
ppo_epochs = 1
max_new_tokens = 8
"""


@pytest.fixture(scope="session")
def rewarded(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Workspace, str]:
    """A workspace with 24 labeled pairs on 8 prompts and a finished reward run (its id); no PPO run."""
    from rlhf.reward import train_reward
    from tools.tiny import hidden_rule_pairs, workspace_with_pairs

    ws = workspace_with_pairs(tmp_path_factory.mktemp("rewarded") / "ws", tiny_model_dir,
                              hidden_rule_pairs(num_prompts=8, pairs_per_prompt=3), TINY_SETTINGS)
    result = train_reward(ws, ws.load_config())
    assert result.status == "finished", result.message
    return ws, result.run_id


@pytest.fixture(scope="session")
def with_ppo(tmp_path_factory: pytest.TempPathFactory, rewarded: tuple[Workspace, str]) -> tuple[Workspace, str]:
    """A copy of `rewarded` with a finished one-step PPO run (its id), checkpointed at its last step."""
    from rlhf.ppo import run_ppo

    ws = Workspace(shutil.copytree(rewarded[0].root, tmp_path_factory.mktemp("ppo") / "ws"))
    result = run_ppo(ws, ws.load_config())
    assert result.status == "finished", result.message
    return ws, result.run_id


def bundle(ws: Workspace, engine: str, out: Path, *extra: str) -> Path:
    assert main(["--workspace", str(ws.root), "export-bundle", "--for", engine, *extra, str(out)]) == 0
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_openrlhf_bundle_has_its_keys_and_the_ppo_policy_adapter(with_ppo, tmp_path):
    from safetensors.torch import load_file

    from rlhf.checkpoints import checkpoint_path

    ws, ppo_run = with_ppo
    out = bundle(ws, "openrlhf", tmp_path / "b")
    pairs, prompts = jsonl(out / "pairs.jsonl"), jsonl(out / "prompts.jsonl")
    assert len(pairs) == 24 and len(prompts) == 8
    # The tiny base has a chat template: chat lists, for OpenRLHF's --apply_chat_template.
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}
    assert pairs[0]["prompt"][0]["role"] == "user" and pairs[0]["chosen"][0]["role"] == "assistant"
    assert set(prompts[0]) == {"input"} and prompts[0]["input"][0]["role"] == "user"
    saved = load_file(str(checkpoint_path(ws.run_dir(ppo_run), 1) / "policy" / "adapter_model.safetensors"))
    exported = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "openrlhf.cli.train_ppo_ray" in readme and f"run {ppo_run}, step 1" in readme


def test_merged_reward_model_loads_without_peft_and_scores_like_rlhf_tui_score(rewarded, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.reward_model import RewardScorer, encode_response

    ws, reward_run = rewarded
    out = bundle(ws, "trl", tmp_path / "b") / "reward"
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    scorer = RewardScorer.from_run(ws, reward_run)
    with Store(ws.db_path) as store:
        items = [(p["prompt"], answer) for p in store.preference_pairs()[:4] for answer in (p["chosen"], p["rejected"])]
    standardised = scorer.score_many(items)
    mean, std = model.config.reward_mean, model.config.reward_std
    assert (model.config.mean, model.config.std) == (mean, std)  # OpenRLHF's names
    assert json.loads((out / "reward.json").read_text())["normalisation"] == {"mean": mean, "std": std}
    for (prompt, answer), expected in zip(items, standardised):
        ids = encode_response(tokenizer, prompt, answer, scorer.max_length)[0]
        with torch.no_grad():
            raw = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert raw == pytest.approx(expected * std + mean, abs=1e-4)
        assert (raw - mean) / std == pytest.approx(expected, abs=1e-4)


def test_trl_bundle_without_a_ppo_run_has_prompt_only_data_and_says_there_is_no_policy(rewarded, tmp_path):
    ws, _ = rewarded
    out = bundle(ws, "trl", tmp_path / "b")
    assert set(jsonl(out / "pairs.jsonl")[0]) == {"prompt", "chosen", "rejected"}
    assert set(jsonl(out / "prompts.jsonl")[0]) == {"prompt"}
    assert not (out / "policy").exists()
    assert "no `policy/`" in (out / "README.md").read_text(encoding="utf-8")


def test_llamafactory_bundle_has_a_ranking_dataset_and_its_lora_reward_format(rewarded, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from rlhf.models import load_causal_lm
    from rlhf.reward_model import RewardScorer, encode_response, raw_scores
    from rlhf.tokens import pad_left

    ws, reward_run = rewarded
    out = bundle(ws, "llamafactory", tmp_path / "b")
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    entry = info["rlhf_tui_pairs"]
    assert entry["ranking"] is True and entry["file_name"] == "pairs.jsonl"
    assert entry["columns"] == {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    assert info["rlhf_tui_prompts"]["columns"] == {"prompt": "prompt"}
    pair = jsonl(out / "pairs.jsonl")[0]
    assert all(isinstance(pair[key], str) for key in entry["columns"].values())  # its alpaca format: strings
    head = load_file(str(ws.run_dir(reward_run) / "reward" / "score_head.safetensors"))["weight"]
    value_head = load_file(str(out / "reward" / "value_head.safetensors"))
    assert value_head.keys() == {"v_head.summary.weight", "v_head.summary.bias"}
    assert torch.equal(value_head["v_head.summary.weight"], head) and head.shape == (1, 64)
    assert torch.equal(value_head["v_head.summary.bias"], torch.zeros(1))
    # The adapter and the value head on the causal-LM base score as `rlhf-tui score` does, before standardising.
    scorer = RewardScorer.from_run(ws, reward_run)
    model = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_dir)), str(out / "reward")).eval()
    v_head = torch.nn.Linear(64, 1)
    v_head.load_state_dict({"weight": value_head["v_head.summary.weight"], "bias": value_head["v_head.summary.bias"]})
    ids, mask = pad_left([encode_response(scorer.tokenizer, "Say hi", "hi there", scorer.max_length)[0]],
                         scorer.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        raw = raw_scores(model, v_head, ids, mask).item()
    assert (raw - scorer.reward.mean) / scorer.reward.std == pytest.approx(scorer.score("Say hi", "hi there"), abs=1e-4)


def test_verl_bundle_is_parquet_with_its_fields(rewarded, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is the optional extra rlhf-tui[bundle]")
    ws, _ = rewarded
    out = bundle(ws, "verl", tmp_path / "b")
    rows = pq.read_table(out / "prompts.parquet").to_pylist()
    assert len(rows) == 8
    assert set(rows[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert rows[0]["prompt"][0]["role"] == "user" and isinstance(rows[0]["prompt"][0]["content"], str)
    assert rows[0]["reward_model"] == {"style": "model", "ground_truth": ""}
    assert (out / "reward" / "model.safetensors").is_file()


def test_verl_without_pyarrow_says_how_to_install_it(rewarded, tmp_path, capsys):
    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed here: test_verl_bundle_is_parquet_with_its_fields covers verl")
    ws, _ = rewarded
    assert main(["--workspace", str(ws.root), "export-bundle", "--for", "verl", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'rlhf-tui[bundle]'" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--for", "deepspeed"], "invalid choice: 'deepspeed'"),
    (["--for", "trl", "--ppo", "REWARD"], "without a PPO checkpoint"),
    (["--for", "trl", "--reward", "nope"], "no run 'nope'"),
])
def test_bad_options_are_one_line_errors(rewarded, tmp_path, capsys, argv, expected):
    ws, reward_run = rewarded
    argv = [reward_run if a == "REWARD" else a for a in argv]
    assert main(["--workspace", str(ws.root), "export-bundle", *argv, str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("stored, saved", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.float32, torch.float32), (None, torch.float32)])
def test_the_merged_model_keeps_a_16_bit_base_dtype_and_is_fp32_otherwise(stored, saved):
    from rlhf.bundle import saved_dtype

    assert saved_dtype(stored) == saved


def test_the_workspace_runs_folder_is_refused(rewarded, capsys):
    ws, _ = rewarded
    assert main(["--workspace", str(ws.root), "export-bundle", "--for", "trl", str(ws.runs_dir / "bundle")]) == 2
    assert "workspace's own state" in capsys.readouterr().err
    assert not (ws.runs_dir / "bundle").exists()


def test_a_ppo_checkpoint_gone_from_disk_is_a_one_line_error(with_ppo, tmp_path, capsys):
    ws = Workspace(shutil.copytree(with_ppo[0].root, tmp_path / "ws"))
    shutil.rmtree(ws.run_dir(with_ppo[1]) / "checkpoints")
    assert main(["--workspace", str(ws.root), "export-bundle", "--for", "trl", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no LoRA adapter here" in err
    assert not (tmp_path / "b").exists()


def test_a_folder_with_files_in_it_is_refused_and_left_alone(rewarded, tmp_path, capsys):
    ws, _ = rewarded
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["--workspace", str(ws.root), "export-bundle", "--for", "trl", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an empty folder" in err
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["notes.txt"]


def test_prompt_records_keep_a_stored_conversation_and_use_each_engines_key():
    from rlhf.bundle import prompt_record

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    stored = {"id": 7, "text": "Hi?", "messages": turns}
    plain = {"id": 8, "text": "Hello?", "messages": None}
    assert prompt_record("openrlhf", stored, chat=True) == {"input": turns}
    assert prompt_record("trl", plain, chat=True) == {"prompt": [{"role": "user", "content": "Hello?"}]}
    assert prompt_record("llamafactory", stored, chat=False) == {"prompt": "Hi?"}
    assert prompt_record("verl", plain, chat=False) == {
        "data_source": "rlhf-tui", "prompt": [{"role": "user", "content": "Hello?"}], "ability": "chat",
        "reward_model": {"style": "model", "ground_truth": ""}, "extra_info": {"prompt_id": 8}}
