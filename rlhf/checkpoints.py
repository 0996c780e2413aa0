"""Checkpoints and resuming, shared by reward training and PPO: atomic folder writes, pruning, training state,
which runs resume.

A checkpoint is a folder `runs/<id>/checkpoints/step-<k>/` (rlhf/checkpoint_folders.py: where, and which are kept)
written to a temp folder and renamed once whole, so a kill or a full disk half way never leaves a broken checkpoint
where a good one was. Weights and optimizer moments are safetensors (no pickle); everything else is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .checkpoint_folders import ADAPTER_FILES, CHECKPOINTS_DIR, checkpoint_path, folder_step, steps_to_keep
from .config import SECTIONS, Config, PPOConfig, Workspace
from .errors import RlhfError, describe_write_error
from .run_rows import Run, RunStatus
from .store import Store, _pid_alive

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


class CheckpointWriteError(Exception):
    """A folder could not be written (e.g. a full disk); whatever was at its path is left as it was."""


def write_folder_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to fill a temp folder beside `final`, then put it in `final`'s place.

    An existing `final` is moved aside first and removed only once the new folder is in place. A write
    that fails (OSError, a safetensors error) raises CheckpointWriteError and leaves `final` untouched.
    """
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise CheckpointWriteError(describe_write_error(exc)) from None
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Write the checkpoint of `step` with `write(folder)`, atomically; CheckpointWriteError names the step."""
    try:
        return write_folder_atomically(checkpoint_path(run_dir, step), write)
    except CheckpointWriteError as exc:
        raise CheckpointWriteError(f"cannot write the checkpoint of step {step}: {exc}") from None


def checkpoints_kept(kind: str, config: dict[str, Any]) -> int:
    """How many checkpoints a run keeps, from the config it started with: a PPO run its newest
    `ppo.keep_checkpoints` (each a policy to evaluate; a run from before that setting: its default), any other run
    only its latest (all a resume needs)."""
    if kind != "ppo":
        return 1
    return config.get("ppo", {}).get("keep_checkpoints", PPOConfig.keep_checkpoints)


def prune_checkpoints(run_dir: Path, latest: int | None = None, keep: int = 1) -> None:
    """Remove the run's checkpoints but those `steps_to_keep(steps, latest, keep)` keeps (all of them for None),
    and leftover temp folders. Call it once the store names `latest` (or no checkpoint at all), so a kill in between
    never leaves it naming a deleted one."""
    folder = run_dir / CHECKPOINTS_DIR
    found = {path: folder_step(path.name) for path in folder.glob("step-*")}
    kept = set() if latest is None else steps_to_keep({step for step in found.values() if step is not None},
                                                      latest, keep)
    for path, step in found.items():
        if step not in kept:
            shutil.rmtree(path, ignore_errors=True)
    if latest is None:
        with suppress(OSError):
            folder.rmdir()


def save_training_state(folder: Path, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Optimizer moments and torch RNG states as safetensors, plus state.json: `extra`, the optimizer's
    param groups and Python's RNG state, so that a resumed run draws what the uninterrupted one would have."""
    optimizer_state = optimizer.state_dict()
    save_file({f"{index}.{name}": value.detach().cpu().contiguous()
               for index, state in optimizer_state["state"].items() for name, value in state.items()},
              folder / OPTIMIZER_FILE)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, folder / RNG_FILE)
    state = {**extra, "optimizer_param_groups": optimizer_state["param_groups"], "python_rng": random.getstate()}
    (folder / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what save_training_state wrote into `optimizer` and the RNGs; returns state.json."""
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    per_param: dict[int, dict[str, Tensor]] = {}
    # Loaded on the CPU: load_state_dict moves Adam's moments to each parameter's device and keeps `step` here.
    for key, value in load_file(folder / OPTIMIZER_FILE).items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    rng = load_file(folder / RNG_FILE)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


# `rlhf-tui <command> --resume RUN` for each kind of run.
RESUME_COMMANDS = {"reward": "train-reward", "ppo": "ppo"}
# What to do when a run cannot resume: start over.
NEW_RUN_ADVICE = {"reward": "train a new reward model with `rlhf-tui train-reward`",
                  "ppo": "start a new run with `rlhf-tui ppo`"}


def check_checkpoint(folder: Path, run_id: str, kind: str, *, adapter: str, tensor_files: tuple[str, ...],
                     state_keys: tuple[str, ...]) -> None:
    """Read every file of a checkpoint before a resume loads anything or touches the run, so that a damaged one
    (truncated by a copy, edited, partly deleted) is one line naming the file, and the run keeps its status and
    reason. Checked: the LoRA `adapter` folder, the safetensors `tensor_files` and the training state's files,
    state.json with `state_keys` and a Python RNG state that `random` accepts."""
    problem = _checkpoint_problem(folder, adapter, tensor_files, state_keys)
    if problem is not None:
        raise RlhfError(f"{folder}: the checkpoint of {kind} run {run_id} is {problem}: it cannot resume; "
                        f"{NEW_RUN_ADVICE[kind]}")


def resume_checkpoint(workspace: Workspace, run: Run, *, adapter: str, tensor_files: tuple[str, ...],
                      state_keys: tuple[str, ...]) -> tuple[int, Path | None]:
    """The step a resumable run goes on from and its checkpoint folder (0 and None: from the start), the folder
    read whole first (`check_checkpoint`). Found from the run id, not the stored path: the workspace may have
    moved since."""
    step = run.checkpoint_step or 0
    if not step:
        return 0, None
    folder = checkpoint_path(workspace.run_dir(run.id), step)
    check_checkpoint(folder, run.id, run.kind, adapter=adapter, tensor_files=tensor_files, state_keys=state_keys)
    return step, folder


def _checkpoint_problem(folder: Path, adapter: str, tensor_files: tuple[str, ...],
                        state_keys: tuple[str, ...]) -> str | None:
    if not folder.is_dir():
        return "missing"
    tensors = [*tensor_files, OPTIMIZER_FILE, RNG_FILE, f"{adapter}/{ADAPTER_FILES[1]}"]
    for name in (f"{adapter}/{ADAPTER_FILES[0]}", STATE_FILE, *tensors):
        if not (folder / name).is_file():
            return f"incomplete ({name} is missing)"
    for name in tensors:
        try:
            loaded = load_file(folder / name)
        except (SafetensorError, OSError) as exc:
            return f"damaged ({name}: {describe_write_error(exc)})"
        if name == RNG_FILE and "torch" not in loaded:
            return f"damaged ({name} holds no torch RNG state)"
    jsons = {}
    for name in (f"{adapter}/{ADAPTER_FILES[0]}", STATE_FILE):
        try:
            jsons[name] = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
            return f"damaged ({name} is not readable JSON: {describe_write_error(exc)})"
    state = jsons[STATE_FILE]
    missing = [key for key in ("optimizer_param_groups", "python_rng", *state_keys)
               if not isinstance(state, dict) or key not in state]
    if missing:
        return f"damaged ({STATE_FILE} lacks {', '.join(missing)})"
    try:
        version, internal, gauss = state["python_rng"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError) as exc:
        return f"damaged ({STATE_FILE}: python_rng is not a Python RNG state: {exc})"
    return None


def resume_command(kind: str, run_id: str) -> str:
    return f"rlhf-tui {RESUME_COMMANDS[kind]} --resume {run_id}"


def resumable_run(store: Store, run_id: str, kind: str) -> Run:
    """The run row, when it is a `kind` run that can resume: stopped, failed or interrupted (or left running by a
    process that is gone)."""
    run = store.run(run_id)
    if run.kind != kind:
        raise RlhfError(f"run {run_id!r} is a {run.kind} run: resume it with `{resume_command(run.kind, run_id)}`")
    if not run.status.is_final and run.pid and _pid_alive(run.pid):
        raise RlhfError(f"run {run_id!r} is still running (pid {run.pid})")
    if run.status == RunStatus.FINISHED:
        raise RlhfError(f"run {run_id!r} already finished its {run.total_steps} steps")
    return run


def config_of_run(run: Run, user_cfg: Config) -> Config:
    """The config a run started with (a resumed run keeps its own settings), except whether remote code may run:
    that comes from the user's own config only, never from a database that may have come with the workspace."""
    stored = Config.from_dict({k: v for k, v in run.config.items() if k in SECTIONS}, source=f"run {run.id}")
    return stored.override({"model.trust_remote_code": user_cfg.model.trust_remote_code})
