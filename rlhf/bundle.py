"""Export bundles: the labels, reward model and policy adapter of a workspace, in another engine's formats.

`rlhf-tui export-bundle --for ENGINE DIR` hands the work over to an engine built for many GPUs (OpenRLHF,
verl, LLaMA-Factory) or to trl, in that engine's own field names:

  openrlhf      pairs.jsonl (prompt/chosen/rejected), prompts.jsonl (input), reward/ merged classifier
  trl           pairs.jsonl (prompt/chosen/rejected), prompts.jsonl (prompt), reward/ merged classifier
  verl          prompts.parquet (data_source, prompt, ability, reward_model, extra_info), reward/ merged
  llamafactory  pairs.jsonl, prompts.jsonl, dataset_info.json ("ranking": true), reward/ LoRA + value head

plus policy/ (the LoRA adapter of a PPO checkpoint, when there is one) and a README.md with the launch
command. Chat-template bases get chat-message data (the engines apply the template, as our reward model saw
it); bases without one get plain strings. The merged reward model is the base loaded unquantized with the
reward LoRA merged in and our score head as `score`: plain `AutoModelForSequenceClassification` loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .config import Workspace
from .data_io import export_record
from .errors import RlhfError
from .store import Store

# Heavy modules (torch, peft, pyarrow) load inside the functions: the CLI imports ENGINES for its --help.

ENGINES = ("openrlhf", "verl", "llamafactory", "trl")
DATA_SOURCE = "rlhf-tui"
LLAMAFACTORY_DATASET = "rlhf_tui_pairs"
LLAMAFACTORY_PROMPTS = "rlhf_tui_prompts"
VALUE_HEAD_FILE = "value_head.safetensors"
PYARROW_MISSING = "--for verl writes parquet and needs pyarrow: pip install 'rlhf-tui[bundle]' (or pip install pyarrow)"


def chat_prompt(text: str, messages: list[dict[str, str]] | None) -> list[dict[str, str]]:
    """The prompt as a chat list: its stored messages, else one user turn with its text."""
    return messages or [{"role": "user", "content": text}]


def pair_record(pair: dict[str, Any], chat: bool) -> dict[str, Any]:
    """One prompt/chosen/rejected line (OpenRLHF, trl, LLaMA-Factory): chat messages or plain strings."""
    return export_record(pair, "messages" if chat else "trl")


def prompt_record(engine: str, prompt: dict[str, Any], chat: bool) -> dict[str, Any]:
    """One line of the prompt-only data an engine's online trainer samples from (OpenRLHF reads `input`,
    trl and LLaMA-Factory `prompt`, verl a chat list in `prompt` with reward_model, ability and extra_info)."""
    messages = chat_prompt(prompt["text"], prompt["messages"])
    if engine == "verl":
        return {"data_source": DATA_SOURCE, "prompt": messages, "ability": "chat",
                "reward_model": {"style": "model", "ground_truth": ""}, "extra_info": {"prompt_id": prompt["id"]}}
    return {"input" if engine == "openrlhf" else "prompt": messages if chat else prompt["text"]}


def ppo_policy_adapter(workspace: Workspace, store: Store, run_id: str | None) -> tuple[Path, str] | None:
    """The policy adapter folder of the named PPO run's last checkpoint, or of the latest PPO run that has
    one, and a description of it ("run ID, step K"); None when no run was named and no PPO run has one."""
    from .checkpoints import checkpoint_path
    from .models import safetensors_adapter
    from .ppo_trainer import POLICY_ADAPTER

    if run_id is not None:
        run = store.run(run_id)
        if run.kind != "ppo" or not run.checkpoint_step:
            raise RlhfError(f"run {run_id!r} is a {run.kind} run without a PPO checkpoint: name a PPO run "
                            "that has one (see `rlhf-tui runs`), or leave out --ppo")
    else:
        with_checkpoint = [run for run in store.runs("ppo") if run.checkpoint_step]
        if not with_checkpoint:
            return None
        run = with_checkpoint[-1]
    folder = checkpoint_path(workspace.run_dir(run.id), run.checkpoint_step) / POLICY_ADAPTER
    return Path(safetensors_adapter(folder)), f"run {run.id}, step {run.checkpoint_step}"


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path))


def saved_dtype(stored: Any) -> Any:
    """The dtype a merged model is saved in: the base's own when it is a 16-bit one (half the size of fp32,
    what the engines load anyway), else fp32. The merge itself runs in fp32 either way."""
    import torch

    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


def _merged_classifier(reward_dir: Path, meta: dict[str, Any], out: Path) -> None:
    """The reward model as one full `AutoModelForSequenceClassification` checkpoint in `out`: the base
    loaded unquantized in fp32, the reward LoRA merged in, the score head as `score`, saved in the base's
    own dtype with the tokenizer and the mean/std (config reward_mean / reward_std, also as mean / std, and
    reward.json)."""
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .models import load_sequence_classifier, load_tokenizer, safetensors_adapter
    from .reward_model import ADAPTER_SUBDIR, META_FILE, SCORE_HEAD_FILE

    tokenizer = load_tokenizer(meta["base_model"], padding_side="right")
    base = load_sequence_classifier(meta["base_model"], "none", pad_token_id=tokenizer.pad_token_id,
                                    device=torch.device("cpu"), dtype=torch.float32)
    # From the files: the loaded model's config.dtype is the dtype it was loaded in, fp32.
    stored = AutoConfig.from_pretrained(meta["base_model"], local_files_only=True).dtype
    adapter = safetensors_adapter(reward_dir / ADAPTER_SUBDIR)
    # Trained on the causal LM, whose decoder the classifier shares: loaded as a plain (task-less) adapter.
    config = PeftConfig.from_pretrained(adapter)
    config.task_type = None
    merged = PeftModel.from_pretrained(base, adapter, config=config).merge_and_unload()
    with torch.no_grad():
        merged.score.weight.copy_(load_file(str(reward_dir / SCORE_HEAD_FILE))["weight"])
    norm = meta["normalisation"]
    merged.config.reward_mean, merged.config.reward_std = norm["mean"], norm["std"]
    merged.config.mean, merged.config.std = norm["mean"], norm["std"]  # the names OpenRLHF's --normalize_reward reads
    merged.to(saved_dtype(stored)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def _llamafactory_reward(reward_dir: Path, meta: dict[str, Any], out: Path) -> None:
    """LLaMA-Factory's LoRA reward model: the adapter, and the score head as its value head
    (`v_head.summary.weight` [1, hidden], `v_head.summary.bias` [1], zero: our head has no bias)."""
    import torch
    from safetensors.torch import load_file, save_file

    from .reward_model import ADAPTER_SUBDIR, META_FILE, SCORE_HEAD_FILE

    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(reward_dir / ADAPTER_SUBDIR / name, out / name)
    weight = load_file(str(reward_dir / SCORE_HEAD_FILE))["weight"]
    save_file({"v_head.summary.weight": weight.contiguous(), "v_head.summary.bias": torch.zeros(1, dtype=weight.dtype)},
              str(out / VALUE_HEAD_FILE))
    (out / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


# What each engine's data files are, and the command that starts it in the bundle folder (BASE: the base model).
DATA_FILES = {
    "openrlhf": "- `pairs.jsonl`: {pairs} preference pairs, keys `prompt`/`chosen`/`rejected` (reward model training)\n"
                "- `prompts.jsonl`: {prompts} prompts, key `input` (PPO)\n",
    "trl": "- `pairs.jsonl`: {pairs} preference pairs, `prompt`/`chosen`/`rejected` (RewardTrainer, DPOTrainer)\n"
           "- `prompts.jsonl`: {prompts} prompts, `prompt` only (GRPOTrainer, RLOOTrainer, the online trainers)\n",
    "verl": "- `prompts.parquet`: {prompts} prompts: `data_source`, `prompt` (chat list), `ability`, `reward_model` "
            "(style model), `extra_info` (our prompt id)\n",
    "llamafactory": "- `pairs.jsonl`: {pairs} preference pairs, `prompt`/`chosen`/`rejected` (plain strings)\n"
                    "- `prompts.jsonl`: {prompts} prompts, `prompt`\n"
                    "- `dataset_info.json`: `" + LLAMAFACTORY_DATASET + "` (`\"ranking\": true`, columns "
                    "prompt/chosen/rejected) and `" + LLAMAFACTORY_PROMPTS + "`: pass this folder as `--dataset_dir`\n",
}
LAUNCH = {
    "openrlhf": "deepspeed --module openrlhf.cli.train_rm --pretrain BASE --dataset pairs.jsonl --prompt_key prompt "
                "--chosen_key chosen --rejected_key rejected --apply_chat_template ...   # a reward model of its own\n"
                "ray job submit -- python3 -m openrlhf.cli.train_ppo_ray --pretrain BASE --reward_pretrain reward "
                "--normalize_reward --prompt_data prompts.jsonl --input_key input --apply_chat_template ...",
    "trl": "from datasets import load_dataset\n"
           "pairs = load_dataset('json', data_files='pairs.jsonl')['train']  # RewardTrainer, DPOTrainer\n"
           "prompts = load_dataset('json', data_files='prompts.jsonl')['train']  # GRPOTrainer(reward_funcs='reward')",
    "verl": "python3 -m verl.trainer.main_ppo data.train_files=prompts.parquet data.val_files=prompts.parquet "
            "actor_rollout_ref.model.path=BASE reward_model.enable=True reward_model.model.path=reward ...",
    "llamafactory": "llamafactory-cli train --stage ppo --model_name_or_path BASE --dataset_dir . --dataset "
                    + LLAMAFACTORY_PROMPTS + " --reward_model reward --reward_model_type lora --finetuning_type lora "
                    "--template TEMPLATE ...",
}
POLICY_FLAG = {"openrlhf": "", "trl": "", "verl": " actor_rollout_ref.model.lora_adapter_path=policy",
               "llamafactory": " --adapter_name_or_path policy"}


def _readme(engine: str, base: str, policy: str | None, counts: dict[str, int]) -> str:
    """The bundle's README: what each file is and the command that starts the engine on it."""
    if engine == "llamafactory":
        reward = ("- `reward/`: the reward model in LLaMA-Factory's LoRA reward format: the adapter and "
                  "`value_head.safetensors` (`v_head.summary.weight` / `bias`); reward.json has the mean/std of its "
                  "scores\n")
    else:
        reward = ("- `reward/`: the reward model, merged: a full sequence-classification checkpoint (`score` head, "
                  "safetensors, tokenizer) that `AutoModelForSequenceClassification.from_pretrained` loads without "
                  "peft; its logits are raw scores: standardise them with config.json's `reward_mean` / "
                  "`reward_std` (also as `mean` / `std`, which OpenRLHF's --normalize_reward applies, and in "
                  "reward.json)\n")
    files = (f"- `policy/`: the PPO policy LoRA adapter ({policy}), peft safetensors for BASE\n" if policy else
             "- no `policy/`: the workspace had no PPO checkpoint (run `rlhf-tui ppo` first for one)\n")
    launch = LAUNCH[engine] + (POLICY_FLAG[engine] if policy else "")
    return (f"# rlhf-tui bundle for {engine}\n\nBASE is the base model: `{base}`. Run from this folder; the flags "
            "follow the engine's documentation when this was written: check them against the version you install."
            f"\n\n## Files\n\n{DATA_FILES[engine].format(**counts)}{reward}{files}\n## Launch\n\n```\n{launch}\n```\n")


def export_bundle(workspace: Workspace, store: Store, engine: str, out_dir: str | Path, *,
                  reward_run: str | None = None, ppo_run: str | None = None) -> Path:
    """Write the bundle for `engine` into `out_dir` (new or empty) atomically; returns the folder."""
    from .checkpoints import CheckpointWriteError, write_folder_atomically
    from .models import load_tokenizer
    from .reward_model import read_reward_meta, reward_dir_of

    if engine not in ENGINES:
        raise RlhfError(f"unknown engine {engine!r} for --for (choose {', '.join(ENGINES)})")
    if engine == "verl":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise RlhfError(PYARROW_MISSING) from None
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RlhfError(f"{out} already exists and is not an empty folder: name a new one")
    if workspace.owns(out):
        raise RlhfError(f"{out}: is this workspace's own state (rlhf.db, rlhf.toml, runs/): name a new folder")
    run_id = store.finished_reward_run(reward_run).id
    reward_dir = reward_dir_of(workspace.run_dir(run_id))
    meta = read_reward_meta(reward_dir)
    policy = ppo_policy_adapter(workspace, store, ppo_run)
    # LLaMA-Factory's ranking data is plain strings: it applies its own --template.
    chat = engine != "llamafactory" and bool(load_tokenizer(meta["base_model"]).chat_template)
    pairs = [pair_record(p, chat) for p in store.preference_pairs()]
    prompts = [prompt_record(engine, p, chat) for p in store.prompts()]

    def write(folder: Path) -> None:
        if engine == "verl":
            _write_parquet(folder / "prompts.parquet", prompts)
        else:
            _write_jsonl(folder / "pairs.jsonl", pairs)
            _write_jsonl(folder / "prompts.jsonl", prompts)
        if engine == "llamafactory":
            info = {LLAMAFACTORY_DATASET: {"file_name": "pairs.jsonl", "ranking": True,
                                           "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}},
                    LLAMAFACTORY_PROMPTS: {"file_name": "prompts.jsonl", "columns": {"prompt": "prompt"}}}
            (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
            _llamafactory_reward(reward_dir, meta, folder / "reward")
        else:
            _merged_classifier(reward_dir, meta, folder / "reward")
        if policy is not None:
            shutil.copytree(policy[0], folder / "policy")
        counts = {"pairs": len(pairs), "prompts": len(prompts)}
        readme = _readme(engine, meta["base_model"], policy[1] if policy else None, counts)
        (folder / "README.md").write_text(readme, encoding="utf-8")

    try:
        return write_folder_atomically(out, write)
    except CheckpointWriteError as exc:
        raise RlhfError(f"{out}: cannot write the bundle: {exc}") from None
