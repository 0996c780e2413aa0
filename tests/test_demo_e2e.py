"""Demo mode, and the bundled demo end to end: label by a hidden rule, train the reward model, run PPO,
and see the rule's share of sampled answers rise.

The end-to-end test uses the shipped data/demo model and prompts with the demo defaults, as
`rlhf-tui` in an empty folder does: 40 pairs labeled by "polite beats not polite" (21 decided, the
rest skipped), reward model, 30 PPO steps. Measured on the shared 2-core box (OMP_NUM_THREADS=1, about
a minute in all): of 80 answers to 40 prompts not used for labeling, the polite share went from 0.36
to 0.925 and the well-formed share from 0.95 to 0.90 (log KL controller, demo target 2, beta >= 0.1). The test asks for a rise of at least MIN_RISE
with at least MIN_READABLE well formed after.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rlhf import cli
from rlhf.config import Config, Workspace, keys_set_in
from tools.demo import answer_style_features
from rlhf.demo_mode import (DEMO_DEFAULTS, DEMO_NOTICE, DEMO_PROMPT_TAG, DEMO_TORCH_THREADS, import_demo_prompts,
                            is_demo, use_demo_threads, with_demo_defaults)
from rlhf.paths import demo_model_dir, demo_prompts_file
from rlhf.store import PromptItem, Store

RULE = "is_polite"  # the hidden rule: a polite answer beats one that is not
LABELED_PAIRS = 40
EVAL_PROMPTS = 40
BLIND_PAIRS = 40  # blind evaluation pairs, on prompts the PPO run never drew
MIN_RISE = 0.3
MIN_READABLE = 0.8


def demo_prompt_count() -> int:
    return len([line for line in demo_prompts_file().read_text(encoding="utf-8").splitlines() if line.strip()])


# -- demo mode -----------------------------------------------------------------------------------


def test_demo_defaults_fill_only_what_the_person_did_not_choose():
    cfg = with_demo_defaults(Config().override({"ppo.steps": 7}), chosen={"ppo.steps"})
    assert cfg.ppo.steps == 7
    assert cfg.ppo.batch_size == DEMO_DEFAULTS["ppo.batch_size"] != Config().ppo.batch_size
    assert cfg.reward.epochs == DEMO_DEFAULTS["reward.epochs"]
    own_model = Config().override({"model.name": "some/model"})
    assert not is_demo(own_model)
    assert with_demo_defaults(own_model, chosen=set()).to_dict() == own_model.to_dict()


def test_keys_set_in_lists_the_files_keys(tmp_path: Path):
    path = tmp_path / "rlhf.toml"
    assert keys_set_in(path) == set()
    path.write_text('[ppo]\nsteps = 5\nlr = 1e-4\n[sampling]\ntemperature = 1.5\n', encoding="utf-8")
    assert keys_set_in(path) == {"ppo.steps", "ppo.lr", "sampling.temperature"}


def shown_config(capsys: pytest.CaptureFixture[str], tmp_path: Path, *flags: str) -> Config:
    """The effective config `rlhf-tui config --show` prints for the workspace `tmp_path`."""
    assert cli.main(["config", "--show", "--workspace", str(tmp_path), *flags]) == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out, encoding="utf-8")
    return Config.load(shown)


def test_cli_applies_demo_defaults_where_rlhf_toml_is_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "rlhf.toml").write_text("[ppo]\nsteps = 5\n", encoding="utf-8")
    shown = shown_config(capsys, tmp_path)
    assert shown.ppo.steps == 5  # the file wins
    assert shown.ppo.batch_size == DEMO_DEFAULTS["ppo.batch_size"]
    assert shown.sampling.max_new_tokens == DEMO_DEFAULTS["sampling.max_new_tokens"]
    shown = shown_config(capsys, tmp_path, "--model", "my/model")
    assert (shown.ppo.steps, shown.ppo.batch_size) == (5, Config().ppo.batch_size)  # not demo mode


def test_cli_flags_given_beat_demo_defaults_and_flags_not_given_do_not(tmp_path: Path):
    args = argparse.Namespace(workspace=tmp_path, model=None)
    _, cfg = cli.load_config(args, {"ppo.batch_size": 4, "ppo.lr": None})
    assert (cfg.ppo.batch_size, cfg.ppo.lr) == (4, DEMO_DEFAULTS["ppo.lr"])


def test_demo_mode_sets_torch_threads_and_other_models_keep_them():
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(DEMO_TORCH_THREADS + 1)
        use_demo_threads(Config().override({"model.name": "my/model"}))
        assert torch.get_num_threads() == DEMO_TORCH_THREADS + 1
        use_demo_threads(Config())
        assert torch.get_num_threads() == DEMO_TORCH_THREADS
    finally:
        torch.set_num_threads(threads)


def test_demo_prompts_go_only_into_an_empty_workspace(tmp_path: Path):
    with Store(tmp_path / "rlhf.db") as store:
        assert import_demo_prompts(store) == demo_prompt_count() > 200
        assert all(p["tags"] == [DEMO_PROMPT_TAG] for p in store.prompts())
        assert import_demo_prompts(store) == 0
    with Store(tmp_path / "own.db") as store:
        store.add_prompts([PromptItem(text="my own prompt")], source="test")
        assert import_demo_prompts(store) == 0
        assert [p["text"] for p in store.prompts()] == ["my own prompt"]


def test_app_start_imports_demo_prompts_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch):
    from rlhf_tui.app import cli as app_cli, main as app_main

    opened = []
    monkeypatch.setattr(app_main, "run_app", lambda workspace, config, annotator=None: opened.append(config) or 0)
    assert app_cli.main(["--workspace", str(tmp_path)]) == 0
    assert f"{DEMO_NOTICE}: imported {demo_prompt_count()} demo prompts" in capsys.readouterr().out
    assert is_demo(opened[0]) and opened[0].ppo.steps == DEMO_DEFAULTS["ppo.steps"]
    assert app_cli.main(["--workspace", str(tmp_path)]) == 0  # second start: prompts already there
    assert "imported" not in capsys.readouterr().out


def test_app_header_says_demo_model_only_in_demo_mode(tmp_path: Path):
    from rlhf_tui.app.main import RlhfApp

    demo = RlhfApp(Workspace(tmp_path), Config())
    assert str(demo.format_title("rlhf-tui · label", "")) == f"rlhf-tui · label — {DEMO_NOTICE}"
    assert str(demo.format_title("rlhf-tui · reward model", "reward-1")) == \
        f"rlhf-tui · reward model — reward-1 · {DEMO_NOTICE}"
    own = RlhfApp(Workspace(tmp_path), Config().override({"model.name": "my/model"}))
    assert DEMO_NOTICE not in str(own.format_title("rlhf-tui · label", ""))
    demo.store.close()
    own.store.close()


# -- the demo, end to end ------------------------------------------------------------------------


def rule_choice(text_a: str, text_b: str) -> str:
    """The scripted annotator: the answer that follows the rule wins; when both or neither do, skip."""
    a, b = (answer_style_features(text)[RULE] for text in (text_a, text_b))
    return "a" if a and not b else "b" if b and not a else "skip"


def shares(sampler, prompts: list[dict]) -> tuple[float, float]:
    """Of two answers per prompt (fixed seeds): the share that follows the rule, and the share that is
    well formed (every sentence one the demo grammar can produce: still readable)."""
    features = [answer_style_features(answer.text) for p in prompts
                for answer in sampler.sample(p["text"], p["messages"], prompt_id=p["id"], draw=0).answers]
    return (sum(f[RULE] for f in features) / len(features),
            sum(f["well_formed"] for f in features) / len(features))


@dataclass
class TrainedDemo:
    """The demo after labeling by the rule, its reward model and one run of an algorithm."""

    workspace: Workspace
    base: Any
    sampler: Any
    held_out: list[dict]
    before: tuple[float, float]  # rule share, well-formed share of the base's answers to `held_out`
    scores: list[float]
    adapter: Path | None


def train_demo(root: Path, algorithm: str) -> TrainedDemo:
    from rlhf.engine.worker import latest_policy_adapter
    from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_name
    from rlhf.ppo import run_ppo
    from rlhf.reward import train_reward
    from rlhf.sampling import PairSampler

    workspace = Workspace(root)
    cfg = with_demo_defaults(workspace.load_config(), keys_set_in(workspace.config_path))
    if algorithm != "ppo":  # the same 8 responses a step: 2 prompts x 4 samples (RLOO 0.36 -> 0.94, GRPO -> 0.75)
        cfg = cfg.override({"ppo.algorithm": algorithm, "ppo.batch_size": 2, "ppo.samples_per_prompt": 4})
    assert is_demo(cfg) and resolve_model_name(cfg) == str(demo_model_dir())
    model_name = resolve_model_name(cfg)
    tokenizer = load_tokenizer(model_name)
    base = load_causal_lm(model_name).eval()
    sampler = PairSampler(base, tokenizer, cfg.sampling, cfg.model.max_prompt_tokens)

    with Store(workspace.db_path) as store:
        import_demo_prompts(store)
        order = store.prompt_order_for_labeling(cfg.sampling.seed)
        labeled = [store.prompt(i) for i in order[:LABELED_PAIRS]]
        held_out = [store.prompt(i) for i in order[LABELED_PAIRS:LABELED_PAIRS + EVAL_PROMPTS]]
        for prompt in labeled:
            pair = sampler.sample(prompt["text"], prompt["messages"], prompt_id=prompt["id"], draw=0)
            ids = [store.add_response(prompt["id"], answer.text, model=model_name) for answer in pair.answers]
            store.add_comparison(prompt["id"], *ids, rule_choice(*(answer.text for answer in pair.answers)))
        before = shares(sampler, held_out)

        reward = train_reward(workspace, cfg, store=store)
        assert reward.status == "finished", reward.message
        ppo = run_ppo(workspace, cfg, store=store)
        assert ppo.status == "finished", ppo.message
        scores = [row["value"] for row in store.metrics(ppo.run_id, "score_mean")]
        adapter = latest_policy_adapter(store, workspace, model_name)  # what the app's engine samples from next
    return TrainedDemo(workspace, base, sampler, held_out, before, scores, adapter)


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TrainedDemo]:
    """`trained_demo(algorithm)`: `train_demo` in a fresh folder, once per algorithm for the whole module (the
    blind evaluation test reuses the PPO one)."""
    built: dict[str, TrainedDemo] = {}

    def get(algorithm: str) -> TrainedDemo:
        if algorithm not in built:
            built[algorithm] = train_demo(tmp_path_factory.mktemp(f"demo-{algorithm}"), algorithm)
        return built[algorithm]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_demo_end_to_end_rule_share_rises_after_ppo(trained_demo: Callable[[str], TrainedDemo], algorithm: str):
    from peft import PeftModel

    demo = trained_demo(algorithm)
    scores = demo.scores
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5  # the reward curve rises
    assert demo.adapter is not None
    before, readable_before = demo.before
    demo.sampler.model = PeftModel.from_pretrained(demo.base, demo.adapter).eval()
    try:
        after, readable_after = shares(demo.sampler, demo.held_out)
    finally:
        demo.sampler.model = demo.sampler.model.unload()  # the plain base again
    assert after >= before + MIN_RISE, (before, after)
    assert readable_after >= MIN_READABLE, (readable_before, readable_after)


@pytest.mark.slow
def test_demo_blind_eval_the_trained_policy_beats_the_reference(trained_demo: Callable[[str], TrainedDemo],
                                                                 capsys: pytest.CaptureFixture[str]):
    """`rlhf-tui eval prepare` on prompts PPO never drew, labeled blind by the same "prefer polite" annotator
    (a tie when neither or both answers are polite), and `eval report`: the trained policy wins, the lower end
    of its 95% interval above 0.5."""
    demo = trained_demo("ppo")
    where = ["--workspace", str(demo.workspace.root)]
    assert cli.main(["eval", "prepare", "-n", str(BLIND_PAIRS), "--seed", "0", *where]) == 0
    with Store(demo.workspace.db_path) as store:
        (session,) = store.eval_sessions()
        for pair in store.eval_pairs(session["id"]):
            choice = rule_choice(pair["text_a"], pair["text_b"])
            store.add_eval_decision(pair["id"], "tie" if choice == "skip" else choice, annotator="polite-script")
    capsys.readouterr()
    assert cli.main(["eval", "report", "--json", *where]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert (result["opponent"], result["decided"]) == ("reference", BLIND_PAIRS)
    assert result["wilson_95"][0] > 0.5, result
