"""Where a run's checkpoints live and which of them it keeps. No torch here: the app lists a run's checkpoints
(through rlhf.evaluation) without loading the ML stack; rlhf/checkpoints.py writes, prunes and reads them.

A checkpoint is the folder `runs/<id>/checkpoints/step-<k>/`, put in place whole by a rename
(`checkpoints.write_folder_atomically`); `step-<k>.tmp` and `step-<k>.old` beside it are that write's leftovers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
# A PPO checkpoint's policy LoRA: the PEFT adapter's name, and so the name of its folder in a checkpoint.
POLICY_ADAPTER = "policy"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_STEP_FOLDER = re.compile(r"step-(\d+)")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{step}"


def folder_step(name: str) -> int | None:
    """The step of a checkpoint folder's name (`step-12`: 12); None for any other name (a `.tmp` or `.old`
    leftover of a write)."""
    match = _STEP_FOLDER.fullmatch(name)
    return int(match.group(1)) if match else None


def steps_to_keep(steps: Iterable[int], latest: int, keep: int) -> set[int]:
    """The checkpoint steps a run keeps once the checkpoint of `latest` is written and its row names it: `latest`
    and the newest `keep - 1` of the older `steps`. Steps newer than `latest` are not kept: they are leftovers of
    a run killed after writing a checkpoint but before its row named it, then resumed from an older one."""
    older = sorted((step for step in steps if step < latest), reverse=True)
    return {latest, *older[:keep - 1]}


def kept_checkpoint_steps(run_dir: Path, adapter: str) -> list[int]:
    """The steps of a run's checkpoints on disk, oldest first: whole folders only (named `step-<k>`, holding the
    LoRA adapter `adapter`'s files)."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    steps = [(folder_step(path.name), path) for path in folder.iterdir()]
    return sorted(step for step, path in steps
                  if step is not None and all((path / adapter / name).is_file() for name in ADAPTER_FILES))
