"""Blind evaluation: win-rate statistics by hand, held-out prompts replayed from a run's draws, the store's eval
tables, and `rlhf-tui eval prepare / report` on the tiny model (one-line errors for bad input)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from rlhf import cli
from rlhf.checkpoint_folders import ADAPTER_FILES, POLICY_ADAPTER, checkpoint_path
from rlhf.config import Config, Workspace
from rlhf.errors import RlhfError
from rlhf.evaluation import (REFERENCE, candidate_side, checkpoint_system, eval_report, kept_checkpoints, plan_eval,
                             replayed_draws, trained_prompt_ids)
from rlhf.reward_pairs import usable_pairs
from rlhf.store import PromptItem, Store
from rlhf.win_rate import eval_outcome, tally_outcomes, win_rate, win_rate_interval

# -- statistics ------------------------------------------------------------------------------------


def test_eval_outcome_from_the_candidates_side():
    assert [eval_outcome(choice, "a") for choice in ("a", "b", "tie", "both_bad", "skip")] == \
        ["win", "loss", "tie", "tie", None]
    assert [eval_outcome(choice, "b") for choice in ("a", "b")] == ["loss", "win"]
    assert tally_outcomes(["win", "tie", None, "win", "loss"]) == {"win": 2, "tie": 1, "loss": 1}


def test_win_rate_counts_ties_half():
    assert win_rate(8, 4, 4) == 0.625  # (8 + 4/2) / 16
    assert win_rate(0, 6, 0) == 0.5  # ties only: no difference
    assert win_rate(0, 0, 0) is None


def test_win_rate_interval_is_wilson_on_half_ties():
    # 8 wins, 4 ties, 4 losses: p = 10/16 = 0.625, n = 16, z = 1.959964, z² = 3.841459.
    # centre = p + z²/2n = 0.625 + 0.120046 = 0.745046; spread = z·sqrt(p(1-p)/n + z²/4n²)
    # = 1.959964 · sqrt(0.0146484 + 0.0037514) = 0.265862; denominator = 1 + z²/n = 1.240091.
    low, high = win_rate_interval(8, 4, 4)
    assert low == pytest.approx((0.745046 - 0.265862) / 1.240091, abs=1e-5)  # 0.38641
    assert high == pytest.approx((0.745046 + 0.265862) / 1.240091, abs=1e-5)  # 0.81519
    assert win_rate_interval(0, 0, 0) == (0.0, 1.0)


def test_candidate_side_is_a_seeded_coin_flip():
    sides = [candidate_side(7, prompt_id) for prompt_id in range(200)]
    assert sides == [candidate_side(7, prompt_id) for prompt_id in range(200)]  # reproducible from the seed
    assert 80 < sides.count("a") < 120  # both sides, about half each
    assert sides != [candidate_side(8, prompt_id) for prompt_id in range(200)]


# -- held-out prompts --------------------------------------------------------------------------------


def test_replayed_draws_cover_each_epoch_once():
    from rlhf.ppo import prompt_batch

    assert len(replayed_draws(10, 4, 2, 0, prompt_batch)) == 8  # 8 draws of one epoch's shuffle: no repeats
    assert replayed_draws(10, 4, 3, 0, prompt_batch) == set(range(10))  # 12 draws: the epoch is done
    assert replayed_draws(10, 4, 0, 0, prompt_batch) == set()


def add_prompts(store: Store, count: int, tag: str = "demo", start: int = 0) -> list[int]:
    return store.add_prompts([PromptItem(text=f"question {i}?", tags=[tag]) for i in range(start, start + count)],
                             source="test")[0]


def add_policy_files(folder: Path) -> None:
    """Stand-ins for a checkpoint's policy adapter files (what makes it a whole checkpoint to list)."""
    (folder / POLICY_ADAPTER).mkdir(parents=True)
    for name in ADAPTER_FILES:
        (folder / POLICY_ADAPTER / name).write_text("{}")


def add_ppo_run(store: Store, workspace: Workspace, *, step: int = 2, batch_size: int = 4, prompt_tag: str = "",
                model: str = "tiny", checkpoint: bool = True, **config) -> str:
    """A PPO run row (as run_ppo writes it) with stand-in policy adapter files at its checkpoint; it starts at
    least a millisecond (the stored times' resolution) after the prompts before it and before those after."""
    time.sleep(0.002)
    cfg = Config().override({"model.name": model, "ppo.batch_size": batch_size, "ppo.prompt_tag": prompt_tag,
                             **config})
    run_id = store.create_run("ppo", cfg.to_dict(), total_steps=step)
    if checkpoint:
        folder = checkpoint_path(workspace.run_dir(run_id), step)
        add_policy_files(folder)
        store.update_run(run_id, status="finished", step=step, checkpoint=str(folder), checkpoint_step=step)
    time.sleep(0.002)
    return run_id


def test_trained_prompts_are_the_runs_replayed_draws(workspace: Workspace, store: Store):
    ids = add_prompts(store, 10)
    add_prompts(store, 3, tag="other", start=10)
    run = store.run(add_ppo_run(store, workspace, prompt_tag="demo"))
    trained = trained_prompt_ids(store, run, 2)
    assert len(trained) == 8 and trained < set(ids)  # 2 steps of 4 from the 10 tagged prompts
    later = add_prompts(store, 2, start=20)  # imported after the run started: never drawn
    assert trained_prompt_ids(store, run, 3) == set(ids)
    assert not set(later) & trained_prompt_ids(store, run, 3)


def test_a_run_resumed_after_new_prompts_counts_its_whole_list_as_trained(workspace: Workspace, store: Store):
    ids = add_prompts(store, 10)
    run_id = add_ppo_run(store, workspace)
    added = add_prompts(store, 2, start=20)
    time.sleep(0.002)
    store.resume_run(run_id, 1)  # re-reads the prompt list: the replay no longer holds
    assert trained_prompt_ids(store, store.run(run_id), 1) == set(ids + added)


def test_plan_picks_held_out_prompts_only(workspace: Workspace, store: Store):
    add_prompts(store, 10)
    run_id = add_ppo_run(store, workspace)
    trained = trained_prompt_ids(store, store.run(run_id), 2)
    plan = plan_eval(store, workspace, count=5, seed=3)
    assert plan.candidate.label == f"{run_id}@2" and plan.opponent.label == REFERENCE
    assert [p["id"] for p in plan.prompts] == [p["id"] for p in plan_eval(store, workspace, count=5, seed=3).prompts]
    assert len(plan.prompts) == 2 and not {p["id"] for p in plan.prompts} & trained  # only 2 of 10 held out
    assert plan.candidate_sides == [candidate_side(3, p["id"]) for p in plan.prompts]


@pytest.mark.parametrize(("setup", "kwargs", "message"), [
    ("none", {}, "no PPO run with a checkpoint to evaluate: run `rlhf-tui ppo` first"),
    ("run", {"run_id": "ppo-nope"}, "no run 'ppo-nope' (see `rlhf-tui runs`)"),
    ("run", {"checkpoint": 1}, "keeps no checkpoint of step 1: it keeps step 2 (use --checkpoint with one of them)"),
    ("reward", {}, "is a reward run: evaluation compares PPO checkpoints"),
    ("run", {"against": "self"}, "is the run being evaluated: name another run, or 'reference'"),
    ("trained", {}, "no held-out prompts: every one was drawn for the PPO run's rollouts"),
    ("run", {"prompt_tag": "nothing"}, "no prompts tagged 'nothing' (see `rlhf-tui prompts list`)"),
    ("trained", {"prompt_tag": "demo"}, "no held-out prompts tagged 'demo': every one was drawn"),
    ("run", {"count": 0}, "-n must be at least 1, got 0"),
])
def test_plan_errors_say_what_to_do(workspace: Workspace, store: Store, setup: str, kwargs: dict, message: str):
    add_prompts(store, 10)
    if setup in ("run", "trained"):
        run_id = add_ppo_run(store, workspace, step=3 if setup == "trained" else 2)
        if kwargs.get("against") == "self":
            kwargs = {"against": run_id}
    if setup == "reward":
        kwargs = {"run_id": store.create_run("reward", {})}
    with pytest.raises(Exception) as raised:
        plan_eval(store, workspace, **kwargs)
    assert message in str(raised.value)


def test_opponent_runs_on_another_base_are_refused(workspace: Workspace, store: Store):
    add_prompts(store, 40)
    first = add_ppo_run(store, workspace, model="one")
    other = add_ppo_run(store, workspace, model="two")
    with pytest.raises(Exception, match="were trained on different base models"):
        plan_eval(store, workspace, run_id=first, against=other)
    assert checkpoint_system(store, workspace, None, None).run_id == other  # the latest run with a checkpoint


def test_kept_checkpoints_are_whole_folders_up_to_the_rows_step(workspace: Workspace, store: Store):
    add_prompts(store, 40)
    run_id = add_ppo_run(store, workspace, step=6)
    run_dir = workspace.run_dir(run_id)
    for step in (2, 4, 8):  # 8: newer than the row's 6, left by a run killed before its row named it, then resumed
        add_policy_files(checkpoint_path(run_dir, step))
    (checkpoint_path(run_dir, 5) / POLICY_ADAPTER).mkdir(parents=True)  # no adapter files: not a whole checkpoint
    assert kept_checkpoints(workspace, store.run(run_id)) == [2, 4, 6]
    assert checkpoint_system(store, workspace, run_id, None) == checkpoint_system(store, workspace, run_id, 6)
    older = plan_eval(store, workspace, run_id=run_id, checkpoint=4, seed=1)
    assert (older.candidate.label, older.candidate.step) == (f"{run_id}@4", 4)
    assert older.candidate.adapter == checkpoint_path(run_dir, 4) / POLICY_ADAPTER
    for step in (5, 8, 1):
        with pytest.raises(RlhfError, match=f"keeps no checkpoint of step {step}: it keeps steps 2, 4, 6 "):
            checkpoint_system(store, workspace, run_id, step)
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(RlhfError, match=f"the checkpoints of PPO run '{run_id}' are gone from disk"):
        checkpoint_system(store, workspace, run_id, None)


# -- store and report -------------------------------------------------------------------------------


def add_session(store: Store, session_id: str, candidate: str, run_id: str, sides: list[str]) -> list[int]:
    """A session with one pair per side in `sides` (fresh prompts and answers); returns the pair ids."""
    pairs = []
    for side in sides:
        prompt_id = add_prompts(store, 1, start=len(store.prompts()) + 100)[0]
        a, b = (store.add_response(prompt_id, text, model="m", source="eval") for text in ("left", "right"))
        pairs.append({"prompt_id": prompt_id, "response_a_id": a, "response_b_id": b, "candidate_side": side})
    store.add_eval_session({"id": session_id, "candidate": candidate, "run_id": run_id, "checkpoint_step": 2,
                            "opponent": REFERENCE, "seed": 1}, pairs)
    return [pair["id"] for pair in store.eval_pairs(session_id)]


def test_eval_decisions_stay_out_of_training_pairs_and_report_per_checkpoint(workspace: Workspace, store: Store):
    run_id = add_ppo_run(store, workspace)
    first = add_session(store, "eval-1", f"{run_id}@2", run_id, ["a", "b", "a", "b", "a"])
    second = add_session(store, "eval-2", f"{run_id}@2", run_id, ["b"])
    # candidate on a, b, a, b, a: chosen a (win), a (loss), tie (tie), both bad (tie), skip; then b (win)
    for pair_id, choice in zip(first + second, ["a", "a", "tie", "both_bad", "skip", "b"]):
        store.add_eval_decision(pair_id, choice, annotator="me", decision_ms=900)
    assert store.preference_pairs(include_ties=True) == []  # left out of reward training and export
    assert len(store.preference_pairs(include_ties=True, include_eval=True)) == 4
    config = workspace.load_config().override({"reward.min_pairs": 1, "reward.use_ties": True})
    with pytest.raises(RlhfError, match="only 0 usable preference pairs"):
        usable_pairs(store, config)
    assert len(usable_pairs(store, config.override({"reward.use_eval_labels": True}))[0]) == 4  # only when asked
    (row,) = eval_report(store)
    assert (row["candidate"], row["opponent"], row["sessions"]) == (f"{run_id}@2", REFERENCE, ["eval-1", "eval-2"])
    assert (row["wins"], row["ties"], row["losses"], row["skips"], row["pairs"], row["decided"]) == (2, 2, 1, 1, 6, 6)
    assert row["win_rate"] == 0.6  # (2 + 2/2) / 5
    assert row["wilson_95"] == list(win_rate_interval(2, 2, 1))
    assert [s["decided"] for s in store.eval_sessions()] == [5, 1]


def test_an_undone_eval_decision_leaves_the_pair_undecided(workspace: Workspace, store: Store):
    run_id = add_ppo_run(store, workspace)
    (pair_id,) = add_session(store, "eval-1", f"{run_id}@2", run_id, ["a"])
    comparison = store.add_eval_decision(pair_id, "a")
    store.delete_comparison(comparison)
    assert store.eval_pairs("eval-1")[0]["choice"] is None
    assert eval_report(store)[0]["win_rate"] is None


# -- the command, on the tiny model -----------------------------------------------------------------


def add_tiny_ppo_run(store: Store, workspace: Workspace, model_dir: Path, steps: tuple[int, ...]) -> str:
    """A PPO run on the tiny model keeping a checkpoint of each of `steps` (its row names the last), each holding
    a random (non-zero) policy LoRA of its own: the policies answer differently from the reference and each other."""
    import torch
    from peft import get_peft_model

    from rlhf.lora import lora_config
    from rlhf.models import load_causal_lm

    run_id = add_ppo_run(store, workspace, model=str(model_dir), batch_size=2, step=steps[-1])
    for step in steps:
        folder = checkpoint_path(workspace.run_dir(run_id), step)
        shutil.rmtree(folder, ignore_errors=True)
        base = load_causal_lm(str(model_dir))
        config = lora_config(base, 4, 8, 0.0)
        config.init_lora_weights = False  # random B too
        torch.manual_seed(step)
        get_peft_model(base, config, adapter_name=POLICY_ADAPTER).save_pretrained(folder, safe_serialization=True)
    return run_id


@pytest.fixture
def tiny_ppo_run(workspace: Workspace, store: Store, tiny_model_dir: Path) -> str:
    """A PPO run on the tiny model with one checkpoint (step 1) holding a random policy LoRA, and 10 prompts."""
    add_prompts(store, 10)
    return add_tiny_ppo_run(store, workspace, tiny_model_dir, (1,))


@pytest.fixture
def tiny_ppo_run_two_checkpoints(workspace: Workspace, store: Store, tiny_model_dir: Path) -> str:
    """A PPO run on the tiny model keeping the checkpoints of steps 1 and 2 (random policies), and 10 prompts."""
    add_prompts(store, 10)
    return add_tiny_ppo_run(store, workspace, tiny_model_dir, (1, 2))


def test_eval_prepare_and_report_on_the_tiny_model(workspace: Workspace, store: Store, tiny_ppo_run: str,
                                                   capsys: pytest.CaptureFixture[str]):
    args = ["--workspace", str(workspace.root)]
    assert cli.main(["eval", "prepare", "-n", "5", "--seed", "4", *args]) == 0
    out = capsys.readouterr().out
    assert f"5 blind pairs of {tiny_ppo_run}@1 vs reference on held-out prompts (seed 4)" in out
    (session,) = store.eval_sessions()
    pairs = store.eval_pairs(session["id"])
    trained = trained_prompt_ids(store, store.run(tiny_ppo_run), 1)
    assert len(pairs) == 5 and not {pair["prompt_id"] for pair in pairs} & trained
    for pair in pairs:
        assert pair["candidate_side"] == candidate_side(4, pair["prompt_id"])
        candidate, opponent = (pair["response_a_id"], pair["response_b_id"])[::1 if pair["candidate_side"] == "a"
                                                                              else -1]
        assert store.response(candidate)["adapter"].endswith("policy") and store.response(opponent)["adapter"] is None
    assert any(pair["text_a"] != pair["text_b"] for pair in pairs)
    assert cli.main(["eval", "report", *args]) == 0
    assert "vs reference: no decisions yet (5 pairs to label)" in capsys.readouterr().out
    for pair in pairs:
        store.add_eval_decision(pair["id"], pair["candidate_side"])  # the candidate always wins
    assert cli.main(["eval", "report", "--json", *args]) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert (row["wins"], row["win_rate"]) == (5, 1.0) and row["wilson_95"][0] == pytest.approx(0.5655, abs=1e-4)


@pytest.mark.parametrize(("flags", "message"), [
    (["--run", "ppo-nope"], "error: no run 'ppo-nope' (see `rlhf-tui runs`)"),
    (["--checkpoint", "7"], "keeps no checkpoint of step 7: it keeps step 1 (use --checkpoint with one of them)"),
    (["--prompts", "nothing"], "error: no prompts tagged 'nothing'"),
])
def test_eval_prepare_bad_input_is_one_line(workspace: Workspace, tiny_ppo_run: str, flags: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]):
    assert cli.main(["eval", "prepare", "--workspace", str(workspace.root), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_export_writes_eval_decisions_only_when_asked(workspace: Workspace, store: Store,
                                                      capsys: pytest.CaptureFixture[str]):
    run_id = add_ppo_run(store, workspace)
    for pair_id, choice in zip(add_session(store, "eval-1", f"{run_id}@2", run_id, ["a", "b"]), ["a", "b"]):
        store.add_eval_decision(pair_id, choice)
    out = workspace.root / "pairs.jsonl"
    args = ["export", str(out), "--workspace", str(workspace.root)]
    assert cli.main(args) == 0 and out.read_text(encoding="utf-8") == ""
    assert cli.main([*args, "--include-eval"]) == 0
    assert [json.loads(line)["chosen"] for line in out.read_text(encoding="utf-8").splitlines()] == ["left", "right"]


def test_two_checkpoints_of_one_run_are_evaluated_and_reported_apart(
        workspace: Workspace, store: Store, tiny_ppo_run_two_checkpoints: str, capsys: pytest.CaptureFixture[str]):
    run_id, args = tiny_ppo_run_two_checkpoints, ["--workspace", str(workspace.root)]
    assert cli.main(["eval", "prepare", "--run", run_id, "--checkpoint", "1", "-n", "3", "--seed", "5", *args]) == 0
    assert f"3 blind pairs of {run_id}@1 vs reference" in capsys.readouterr().out
    assert cli.main(["eval", "prepare", "-n", "3", "--seed", "5", *args]) == 0  # default: the latest
    assert f"3 blind pairs of {run_id}@2 vs reference" in capsys.readouterr().out
    older, newer = store.eval_sessions()
    assert (older["checkpoint_step"], newer["checkpoint_step"]) == (1, 2)
    for session, step in ((older, 1), (newer, 2)):
        pairs = store.eval_pairs(session["id"])
        assert not {pair["prompt_id"] for pair in pairs} & trained_prompt_ids(store, store.run(run_id), step)
        candidates = [pair["response_a_id"] if pair["candidate_side"] == "a" else pair["response_b_id"]
                      for pair in pairs]
        assert {store.response(r)["adapter"] for r in candidates} == {
            str(checkpoint_path(workspace.run_dir(run_id), step) / POLICY_ADAPTER)}
        opponent_side = {"a": "b", "b": "a"}
        for pair in pairs:  # the older checkpoint always wins, the newer always loses
            store.add_eval_decision(pair["id"], pair["candidate_side"] if step == 1 else
                                    opponent_side[pair["candidate_side"]])
    assert cli.main(["eval", "report", "--json", *args]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [(row["candidate"], row["wins"], row["losses"], row["sessions"]) for row in rows] == [
        (f"{run_id}@1", 3, 0, [older["id"]]), (f"{run_id}@2", 0, 3, [newer["id"]])]
    assert cli.main(["eval", "report", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{run_id}@1 vs reference: win rate 1.00")
    assert lines[1].startswith(f"{run_id}@2 vs reference: win rate 0.00")
