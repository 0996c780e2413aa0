"""PPO, RLOO and GRPO runs: `run_ppo` turns `PPOTrainer` steps into a run (store rows, hooks, checkpoints, stop and
resume through its `RunSession`, one run per workspace by a lock); the step itself is `rlhf/ppo_trainer.py`."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .checkpoints import (CheckpointWriteError, config_of_run, load_training_state, resumable_run, resume_checkpoint,
                          save_training_state)
from .config import Config, PPOConfig, Workspace
from .distributed import SINGLE, Ranks
from .errors import RlhfError
from .hooks import RunHooks, RunResult
from .locks import pid_lock
from .models import encode_prompt, format_prompt, resolve_model_name
from .ppo_math import kl_negative_beyond_noise, score_dropped
from .ppo_trainer import (POLICY_ADAPTER, REWARD_ADAPTER, NonFiniteError, PPOTrainer, PreparedPrompt, RolloutScorer,
                          SharedBaseReward, build_trainer, check_settings, load_reward)
from .quantization import unquantized_warning
from .refit import current_reward_run, take_switch_request
from .run_rows import RunStatus
from .runs import RunSession, error_line, open_store
from .store import Store, new_run_id
from .tokens import truncate_left

LOCK_FILE = "ppo.lock"
VALUE_HEAD_FILE = "value_head.safetensors"
STATE_KEYS = ("step", "kl_controller")  # what a PPO checkpoint's state.json holds


# -- prompts -----------------------------------------------------------------------------------

def prepare_prompts(rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                    max_tokens: int) -> tuple[list[PreparedPrompt], int]:
    """Format and tokenize prompts rows once, cutting long ones from the left. Returns (prompts, number cut)."""
    prepared, cut = [], 0
    for row in rows:
        ids, dropped = truncate_left(encode_prompt(tokenizer, format_prompt(tokenizer, row["text"], row["messages"])),
                                     max_tokens)
        cut += dropped > 0
        prepared.append(PreparedPrompt(row["id"], row["text"], row["messages"], ids))
    return prepared, cut


def prompt_batch(n_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts for `step` (1-based): a fresh seeded shuffle of all prompts per epoch.

    A pure function of its arguments, so a resumed run draws exactly the prompts it would have.
    """
    indices = []
    for position in range((step - 1) * batch_size, step * batch_size):
        epoch, offset = divmod(position, n_prompts)
        order = list(range(n_prompts))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        indices.append(order[offset])
    return indices


def _prompt_rows(store: Store, tag: str) -> list[dict[str, Any]]:
    rows = store.prompts(tag=tag or None)
    if not rows:
        where = f" tagged {tag!r}" if tag else ""
        raise RlhfError(f"no prompts{where} in the workspace: import some with `rlhf-tui prompts import FILE`")
    return rows


# -- checkpoints -------------------------------------------------------------------------------

def write_checkpoint_files(trainer: PPOTrainer, folder: Path, step: int) -> None:
    """Fill a PPO checkpoint folder (`RunSession.checkpoint` writes it atomically): policy/ (PEFT adapter,
    safetensors), value_head, optimizer and rng (safetensors), state.json (step, KL controller, optimizer param
    groups, Python RNG)."""
    trainer.model.save_pretrained(folder, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
    if trainer.value_head is not None:
        save_file(trainer.value_head.state_dict(), folder / VALUE_HEAD_FILE)
    save_training_state(folder, trainer.optimizer, {"step": step, "kl_controller": trainer.kl_ctl.state_dict()})


def failure_message(exc: Exception, session: RunSession, cfg: PPOConfig) -> str:
    """The one line a run that cannot go on reports: what failed at which step, the checkpoint kept, what to do."""
    if isinstance(exc, CheckpointWriteError):
        return session.checkpoint_failed(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return session.step_failed("out of GPU memory", f"Lower --batch-size (now {cfg.batch_size}) or "
                                   f"ppo.max_new_tokens (now {cfg.max_new_tokens}), or set model.quantization = "
                                   "\"4bit\" or ppo.gradient_checkpointing = true")
    return session.step_failed(str(exc), "Try a lower --lr or --init-kl")


def load_checkpoint(trainer: PPOTrainer, path: Path) -> None:
    """Restore value head, optimizer, KL controller and RNG states (the adapter is loaded with the model)."""
    if trainer.value_head is not None:
        trainer.value_head.load_state_dict(load_file(path / VALUE_HEAD_FILE))
    state = load_training_state(path, trainer.optimizer)
    trainer.kl_ctl.load_state_dict(state["kl_controller"])


# -- runs --------------------------------------------------------------------------------------

@contextmanager
def ppo_lock(workspace: Workspace) -> Iterator[None]:
    """One PPO run per workspace: runs/ppo.lock holds the owner's pid; a lock whose process is gone is stale."""
    path = workspace.runs_dir / LOCK_FILE
    with pid_lock(path, lambda pid: f"another PPO run (pid {pid}) is running in {workspace.root}: stop it first "
                                    f"(or delete {path} if that process is not rlhf-tui)"):
        yield



def run_ppo(workspace: Workspace, cfg: Config, *, reward_run: str | None = None, resume_run: str | None = None,
            hooks: RunHooks | None = None, store: Store | None = None, ranks: Ranks = SINGLE) -> RunResult:
    """Run (or resume) PPO in `workspace`, writing runs/metrics/samples as it goes (on data-parallel `ranks`, every
    rank runs it on its share of each batch and rank 0 writes: rlhf/distributed.py).

    A fresh run uses `cfg` and `reward_run` (default: the latest finished reward run). `resume_run`
    continues that run from its last checkpoint with the config and reward run it was started with.
    """
    hooks = hooks or RunHooks()
    with ppo_lock(workspace) if ranks.writes else nullcontext(), open_store(workspace, store) as db:
        resumed = resumable_run(db, resume_run, "ppo") if resume_run is not None else None
        if resumed is not None:
            cfg, reward = config_of_run(resumed, cfg), db.run(resumed.parent_run)
            start_step, checkpoint = resume_checkpoint(
                workspace, resumed, adapter=POLICY_ADAPTER, state_keys=STATE_KEYS,
                tensor_files=(VALUE_HEAD_FILE,) if cfg.ppo.algorithm == "ppo" else ())
        else:
            cfg = cfg.override({"model.name": resolve_model_name(cfg)})
            check_settings(cfg.ppo, ranks.world)
            reward, start_step, checkpoint = db.finished_reward_run(reward_run), 0, None
        if resume_run is not None:  # a refit the run switched to scores from the checkpoint it switched at on
            reward = db.run(current_reward_run(db, resume_run, start_step))
        prompt_rows = _prompt_rows(db, cfg.ppo.prompt_tag)
        trainer = build_trainer(workspace, cfg, reward.id, checkpoint, ranks)
        prompts, cut = prepare_prompts(prompt_rows, trainer.tokenizer, cfg.model.max_prompt_tokens)
        ranks.barrier()  # every rank has read the run's row before rank 0 starts or resumes it
        if resumed is None:
            session = RunSession.start(db, workspace, hooks, "ppo", {**cfg.to_dict(), "processes": ranks.world},
                                       total_steps=cfg.ppo.steps, parent_run=reward.id,
                                       run_id=ranks.from_rank0(new_run_id("ppo")), writes=ranks.writes)
        else:
            session = RunSession.resume(db, workspace, hooks, resumed, start_step, writes=ranks.writes)
        with session:
            if session.writes:
                take_switch_request(session.run_dir)  # one left when the run ended: it asked for a switch then
            hooks.on_policy(session.run_id, trainer.model, trainer.tokenizer)
            hooks.on_reward(session.run_id, reward.id, trainer.reward)
            if checkpoint is not None:
                load_checkpoint(trainer, checkpoint)
            if cut:
                session.warn(f"{cut} prompts were cut to their last {cfg.model.max_prompt_tokens} tokens "
                             "(model.max_prompt_tokens)")
            if cfg.model.quantization == "4bit" and (gap := unquantized_warning(trainer.model.get_base_model())):
                session.warn(gap)
            return _train_loop(trainer, session, prompts, partial(load_reward, workspace, cfg, trainer.model,
                                                                  trainer.tokenizer))


def _train_loop(trainer: PPOTrainer, session: RunSession, prompts: list[PreparedPrompt],
                load: Callable[[str, str], RolloutScorer]) -> RunResult:
    cfg, write = trainer.cfg, partial(write_checkpoint_files, trainer)
    previous = None
    try:
        while session.step < cfg.steps:
            if session.should_stop():
                session.stop(write)
                return session.finish(RunStatus.STOPPED, f"stopped at step {session.step}/{cfg.steps}")
            batch = [prompts[i] for i in prompt_batch(len(prompts), cfg.batch_size, session.step + 1, cfg.seed)]
            batch = trainer.ranks.share(batch)  # this rank's prompts (all of them in one process)
            trainer.ranks.seed_step(cfg.seed, session.step)
            metrics, samples = trainer.step(batch)
            session.step_done(metrics, samples)
            if kl_negative_beyond_noise(metrics["kl_k1"], metrics["kl_k1_sem"]):
                session.warn(f"step {session.step}: KL is negative ({metrics['kl_k1']:.3f} ± "
                             f"{metrics['kl_k1_sem']:.3f}, beyond noise): sampling and "
                             "log-probs disagree (check temperature, top-k/top-p)")
            for warning in guard_warnings(session.step, metrics, previous, cfg):
                session.warn(warning)
            previous = metrics
            if session.step % cfg.checkpoint_every == 0 or session.step == cfg.steps:
                session.checkpoint(write)
                switch_reward(trainer, session, load)
    except (NonFiniteError, CheckpointWriteError, torch.OutOfMemoryError) as exc:
        return session.finish(RunStatus.FAILED, failure_message(exc, session, cfg))
    return session.finish(RunStatus.FINISHED, f"finished {cfg.steps} steps")


def switch_reward(trainer: PPOTrainer, session: RunSession, load: Callable[[str, str], RolloutScorer]) -> None:
    """After a checkpoint: score the steps after it with the reward run a refit trained, when the hooks hand one
    over (`rlhf.refit`); `load(reward_run, adapter_name)` builds its scorer. One that cannot be loaded leaves the
    reward as it was. A switch is a warning, the metric `reward_switch` at this step and a `run_rewards` row (what
    a resume reads)."""
    run_id, step = session.run_id, session.step
    reward_run = session.hooks.take_reward_switch(run_id, step)
    if reward_run is None:  # or the one `rlhf-tui refit` asked for from another process, as rank 0 reads it
        reward_run = trainer.ranks.from_rank0(take_switch_request(session.run_dir) if session.writes else None)
    if reward_run is None:
        return
    old = current_reward_run(session.store, run_id, step)
    try:
        scorer = load(reward_run, f"{REWARD_ADAPTER}-{step}")
    except Exception as exc:  # noqa: BLE001 - out of memory included: the run goes on with the reward it had
        error = (f"step {step}: the refit reward run {reward_run} could not be loaded ({error_line(exc)}); PPO keeps "
                 f"scoring with {old}")
        session.warn(error)
        session.hooks.on_reward_switch(run_id, step, reward_run, error)
        return
    if isinstance(trainer.reward, SharedBaseReward):
        trainer.model.delete_adapter(trainer.reward.head.adapter_name)
    trainer.reward = scorer
    session.hooks.on_reward(run_id, reward_run, scorer)
    if session.writes:
        session.store.add_reward_switch(run_id, reward_run, step)
        session.store.log_metrics(run_id, step, {"reward_switch": 1.0})
    session.warn(f"step {step}: PPO scores with the refit reward run {reward_run} from step {step + 1} (was {old})")
    session.hooks.on_reward_switch(run_id, step, reward_run, None)


def guard_warnings(step: int, metrics: dict[str, float], previous: dict[str, float] | None,
                   cfg: PPOConfig) -> list[str]:
    """One line for each collapse guard that acted in this step (or would have to: a score collapse)."""
    warnings = []
    if metrics["early_stopped"]:
        warnings.append(f"step {step}: PPO epochs stopped after {metrics['epochs_done']:.2f} of {cfg.ppo_epochs}: "
                        f"the policy moved more than ppo.max_policy_kl_per_step ({cfg.max_policy_kl_per_step} "
                        "nats per token) from the policy that sampled the rollout")
    if previous is not None and score_dropped(previous["score_mean"], previous["score_std"], metrics["score_mean"],
                                              cfg.score_drop_warning):
        warnings.append(f"step {step}: the mean score fell from {previous['score_mean']:.2f} to "
                        f"{metrics['score_mean']:.2f}, more than {cfg.score_drop_warning} standard deviations: "
                        "the policy may be collapsing (try a lower --lr, or a lower ppo.target_kl)")
    return warnings
