"""Blind evaluation: a PPO checkpoint against the reference (adapters off) or another run's checkpoint.

`plan_eval` picks held-out prompts and a side per pair; `prepare_eval` samples one answer per system to each prompt
and stores the session and its blind pairs; the person labels them with the Label keys (Eval screen), and
`eval_report` turns the decisions into a win rate with ties and a 95% Wilson interval per checkpoint
(`rlhf/win_rate.py`, `docs/evaluation.md`).

Held-out prompts are those the PPO run(s) never drew for a rollout: the run's draws are replayed from its settings
(prompt tag, batch size, seed) over its prompt list up to the checkpoint's step, so prompts imported after the run
count as held out. `--prompts TAG` narrows the candidates to a tag.

This module's top level imports no torch (the app reads reports and runs through it); sampling imports it inside.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .checkpoint_folders import POLICY_ADAPTER, checkpoint_path, kept_checkpoint_steps
from .config import Config, Workspace
from .errors import RlhfError
from .run_rows import Run
from .store import Store, new_run_id
from .win_rate import eval_outcome, tally_outcomes, win_rate, win_rate_interval

REFERENCE = "reference"  # the opponent with every adapter off: the base PPO's KL is measured against
DEFAULT_EVAL_PAIRS = 20
EVAL_SOURCE = "eval"  # the `source` of evaluation answers and decisions


@dataclass(frozen=True)
class System:
    """One side of an evaluation: a PPO run's policy adapter at a checkpoint, or the reference (run None)."""

    label: str  # `RUN@STEP` or "reference"
    run_id: str | None = None
    step: int | None = None
    adapter: Path | None = None  # None: adapters off


@dataclass(frozen=True)
class EvalPlan:
    """What `prepare_eval` samples: prompts (rows of `Store.prompts`) with the candidate's side for each."""

    session_id: str
    candidate: System
    opponent: System
    model_name: str
    prompt_tag: str | None
    seed: int
    prompts: list[dict[str, Any]]
    candidate_sides: list[str]


def candidate_side(seed: int, prompt_id: int) -> str:
    """Blind side assignment: "a" or "b" for the candidate's answer to this prompt, a seeded coin flip."""
    return "a" if random.Random(f"eval:{seed}:{prompt_id}").random() < 0.5 else "b"


def replayed_draws(n_prompts: int, batch_size: int, steps: int, seed: int,
                   prompt_batch: Callable[[int, int, int, int], list[int]]) -> set[int]:
    """Indices (into the run's prompt list) of every prompt a run drew in its first `steps` steps, replaying its
    seeded draws with `prompt_batch(n_prompts, batch_size, step, seed)` (rlhf.ppo's)."""
    return {index for step in range(1, steps + 1) for index in prompt_batch(n_prompts, batch_size, step, seed)}


def trained_prompt_ids(store: Store, run: Run, steps: int) -> set[int]:
    """Prompt ids a PPO run drew for rollouts in its first `steps` steps.

    Its prompt list is the prompts carrying its `ppo.prompt_tag` (all when empty) that existed when it started. A
    resumed run reads its list again: when prompts were added between its start and its latest resume, the draws
    cannot be replayed and every prompt of the list it could have read counts as trained.
    """
    from .ppo import prompt_batch

    ppo = run.config["ppo"]
    tagged = store.prompts(tag=ppo.get("prompt_tag") or None)
    at_start = [p for p in tagged if p["created_at"] <= run.started_at]
    resumed_at = run.session_started_at
    if resumed_at and any(run.started_at < p["created_at"] <= resumed_at for p in tagged):
        return {p["id"] for p in tagged if p["created_at"] <= resumed_at}
    if not at_start:
        return set()
    draws = replayed_draws(len(at_start), ppo["batch_size"], steps, ppo.get("seed", 0), prompt_batch)
    return {at_start[index]["id"] for index in draws}


def kept_checkpoints(workspace: Workspace, run: Run) -> list[int]:
    """The steps of a PPO run's checkpoints that can be evaluated, oldest first: whole folders holding its policy
    adapter (it keeps its newest `ppo.keep_checkpoints`), up to the step its row names. A newer folder is a leftover
    of a run killed before its row named it and resumed from an older checkpoint since: not the run's policy."""
    if not run.checkpoint_step:
        return []
    return [step for step in kept_checkpoint_steps(workspace.run_dir(run.id), POLICY_ADAPTER)
            if step <= run.checkpoint_step]


def checkpoint_system(store: Store, workspace: Workspace, run_id: str | None, step: int | None) -> System:
    """A PPO run's policy at a kept checkpoint (default: the latest PPO run with one, at its latest checkpoint);
    one-line errors for a run that is not a PPO run, has no checkpoint, or does not keep that step."""
    if run_id is None:
        with_checkpoint = [run for run in store.runs("ppo") if run.checkpoint_step]
        if not with_checkpoint:
            raise RlhfError("no PPO run with a checkpoint to evaluate: run `rlhf-tui ppo` first")
        run = with_checkpoint[-1]
    else:
        run = store.run(run_id)
        if run.kind != "ppo":
            raise RlhfError(f"run {run_id!r} is a {run.kind} run: evaluation compares PPO checkpoints "
                            "(see `rlhf-tui runs`)")
    if not run.checkpoint_step:
        raise RlhfError(f"PPO run {run.id!r} has no checkpoint yet")
    kept = kept_checkpoints(workspace, run)
    step = run.checkpoint_step if step is None else step
    folder = checkpoint_path(workspace.run_dir(run.id), step)
    if not kept:
        raise RlhfError(f"the checkpoints of PPO run {run.id!r} are gone from disk ({folder.parent})")
    if step not in kept:
        raise RlhfError(f"PPO run {run.id!r} keeps no checkpoint of step {step}: it keeps step"
                        f"{'s' if len(kept) > 1 else ''} {', '.join(map(str, kept))} (use --checkpoint with one of "
                        "them)")
    return System(f"{run.id}@{step}", run.id, step, folder / POLICY_ADAPTER)


def plan_eval(store: Store, workspace: Workspace, *, run_id: str | None = None, checkpoint: int | None = None,
              against: str = REFERENCE, prompt_tag: str | None = None, count: int = DEFAULT_EVAL_PAIRS,
              seed: int | None = None) -> EvalPlan:
    """Resolve the systems and pick `count` held-out prompts (seeded shuffle) with the candidate's side for each.

    `against` is "reference" or another PPO run id (at its latest checkpoint). The seed (random when None) is
    stored with the session: the same seed picks the same prompts and sides again.
    """
    if count < 1:
        raise RlhfError(f"-n must be at least 1, got {count}")
    candidate = checkpoint_system(store, workspace, run_id, checkpoint)
    runs = [store.run(candidate.run_id)]
    if against == REFERENCE:
        sft = runs[0].config["ppo"].get("sft_adapter")
        opponent = System(REFERENCE, adapter=Path(sft) if sft else None)
    else:
        opponent = checkpoint_system(store, workspace, against, None)
        if opponent.run_id == candidate.run_id:
            raise RlhfError(f"--against {against} is the run being evaluated: name another run, or 'reference'")
        runs.append(store.run(against))
    model_names = {run.config["model"]["name"] for run in runs}
    if len(model_names) > 1:
        raise RlhfError(f"runs {runs[0].id!r} and {runs[1].id!r} were trained on different base models "
                        f"({' and '.join(sorted(model_names))}): compare checkpoints of one base")
    trained = set().union(*(trained_prompt_ids(store, run, system.step or 0)
                            for run, system in zip(runs, (candidate, opponent))))
    named = store.prompts(tag=prompt_tag)
    if prompt_tag and not named:
        raise RlhfError(f"no prompts tagged {prompt_tag!r} (see `rlhf-tui prompts list`)")
    candidates = [p for p in named if p["id"] not in trained]
    if not candidates:
        tagged = f" tagged {prompt_tag!r}" if prompt_tag else ""
        raise RlhfError(f"no held-out prompts{tagged}: every one was drawn for the PPO run's rollouts; import "
                        "prompts it has not seen (`rlhf-tui prompts import FILE --tag heldout`, then "
                        "--prompts heldout)")
    seed = secrets.randbelow(2**31) if seed is None else seed
    random.Random(seed).shuffle(candidates)
    chosen = candidates[:count]
    return EvalPlan(new_run_id("eval"), candidate, opponent, runs[0].config["model"]["name"], prompt_tag, seed,
                    chosen, [candidate_side(seed, p["id"]) for p in chosen])


def prepare_eval(store: Store, plan: EvalPlan, base: Any, tokenizer: Any, cfg: Config,
                 progress: Callable[[int, int], None] | None = None) -> str:
    """Sample one answer per system to each planned prompt on `base` (the plain base model, which is handed back
    plain), then store the answers, the session and its blind pairs; returns the session id.

    Both systems sample each prompt with the same seed (the session seed and the prompt), at the [sampling]
    settings: the answers differ only by the adapters. `progress(done, total)` is called after each prompt.
    """
    from peft import PeftModel

    from .models import safetensors_adapter
    from .sampling import PairSampler, sampling_params

    sampling = replace(cfg.sampling, seed=plan.seed, max_resample=0)
    model = PeftModel.from_pretrained(base, safetensors_adapter(plan.candidate.adapter), adapter_name="candidate").eval()
    if plan.opponent.adapter is not None:
        model.load_adapter(safetensors_adapter(plan.opponent.adapter), adapter_name="opponent")
    sampler = PairSampler(model, tokenizer, sampling, cfg.model.max_prompt_tokens)
    answers = []
    try:
        for done, prompt in enumerate(plan.prompts, 1):
            answers.append([_answer(sampler, model, prompt, adapter) for adapter in ("candidate", "opponent")])
            if progress is not None:
                progress(done, len(plan.prompts))
    finally:
        model.unload()
    pairs = []
    with store.transaction():
        for prompt, side, by_system in zip(plan.prompts, plan.candidate_sides, answers):
            ids = [store.add_response(prompt["id"], answer.text, model=plan.model_name,
                                      adapter=str(system.adapter) if system.adapter else None,
                                      sampling=sampling_params(sampling), seed=plan.seed,
                                      response_tokens=answer.tokens, finished=answer.finished, source=EVAL_SOURCE)
                   for answer, system in zip(by_system, (plan.candidate, plan.opponent))]
            a_id, b_id = ids if side == "a" else ids[::-1]
            pairs.append({"prompt_id": prompt["id"], "response_a_id": a_id, "response_b_id": b_id,
                          "candidate_side": side})
        store.add_eval_session({
            "id": plan.session_id, "candidate": plan.candidate.label, "run_id": plan.candidate.run_id,
            "checkpoint_step": plan.candidate.step, "opponent": plan.opponent.label,
            "opponent_run": plan.opponent.run_id, "opponent_step": plan.opponent.step, "prompt_tag": plan.prompt_tag,
            "seed": plan.seed, "model": plan.model_name, "sampling": sampling_params(sampling)}, pairs)
    return plan.session_id


def _answer(sampler: Any, model: Any, prompt: dict[str, Any], adapter: str) -> Any:
    """One answer from `adapter` ("opponent" with no opponent adapter loaded: every adapter off): the first of a
    sampled pair, so that both systems draw with the same seed."""
    if adapter == "opponent" and "opponent" not in model.peft_config:
        with model.disable_adapter():
            return sampler.sample(prompt["text"], prompt["messages"], prompt_id=prompt["id"], draw=0).answers[0]
    model.set_adapter(adapter)
    return sampler.sample(prompt["text"], prompt["messages"], prompt_id=prompt["id"], draw=0).answers[0]


# -- reports -------------------------------------------------------------------------------------


def outcome_summary(outcomes: list[str | None]) -> dict[str, Any]:
    """Wins, ties, losses, skips, the win rate (ties half) and its 95% Wilson interval, for a list of outcomes."""
    counts = tally_outcomes(outcomes)
    wins, ties, losses = counts["win"], counts["tie"], counts["loss"]
    return {"wins": wins, "ties": ties, "losses": losses, "skips": outcomes.count(None),
            "win_rate": win_rate(wins, ties, losses), "wilson_95": list(win_rate_interval(wins, ties, losses))}


def eval_report(store: Store) -> list[dict[str, Any]]:
    """One row per candidate checkpoint and opponent: sessions, pairs, decided pairs and `outcome_summary`."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for session in store.eval_sessions():
        group = groups.setdefault((session["candidate"], session["opponent"]), {
            "candidate": session["candidate"], "opponent": session["opponent"], "sessions": [], "pairs": 0,
            "outcomes": []})
        group["sessions"].append(session["id"])
        group["pairs"] += session["pairs"]
        group["outcomes"] += session_outcomes(store, session["id"])
    return [{**{k: v for k, v in group.items() if k != "outcomes"}, "decided": len(group["outcomes"]),
             **outcome_summary(group["outcomes"])} for group in groups.values()]


def describe_result(row: dict[str, Any]) -> str:
    """One line of a report row: who beat whom how often, with the interval and the counts behind it."""
    if row["win_rate"] is None:
        return f"{row['candidate']} vs {row['opponent']}: no decisions yet ({row['pairs']} pairs to label)"
    low, high = row["wilson_95"]
    skipped = f", {row['skips']} skipped" if row["skips"] else ""
    return (f"{row['candidate']} vs {row['opponent']}: win rate {row['win_rate']:.2f} (95% Wilson {low:.2f}-"
            f"{high:.2f}; ties count half) from {row['wins']} wins, {row['ties']} ties, {row['losses']} losses"
            f"{skipped} on {row['decided']} of {row['pairs']} pairs")


def session_outcomes(store: Store, session_id: str) -> list[str | None]:
    """The candidate's outcome on each decided pair of a session (None for a skip)."""
    return [eval_outcome(pair["choice"], pair["candidate_side"]) for pair in store.eval_pairs(session_id)
            if pair["choice"] is not None]

