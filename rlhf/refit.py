"""Refit: the reward model trained again on every label so far while a PPO run trains, and the run's switch to it.

The engine trains a refit between two steps of the PPO run, in the run's own thread (the run waits; nothing else
touches its model or its random streams), and the run switches to it at its next checkpoint. Headless,
`rlhf-tui refit` trains it in a process of its own beside the running PPO and leaves a switch request in the run's
folder (`request_reward_switch`), which the run takes at its next checkpoint. A checkpoint is
where a run resumes from, so the reward in effect at each checkpoint is all a resume needs to know: the run's row
names the reward run it started with (`parent_run`), the `run_rewards` table each switch and the step after which
it scores. A refit that fails or is stopped changes nothing: the run keeps scoring with the reward it had.

No torch at import time (the engine imports this before a run needs it).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .checkpoints import config_of_run
from .config import Config, Workspace
from .hooks import RunHooks, RunResult
from .store import Store


def reward_run_at(history: list[dict[str, Any]], step: int) -> str:
    """The reward run that scores the steps after `step` of a PPO run whose reward `history` is {from_step,
    reward_run} rows (the one it started with from step 0, then its switches): the latest one from at or before
    `step`."""
    return max((row for row in history if row["from_step"] <= step), key=lambda row: row["from_step"])["reward_run"]


def current_reward_run(store: Store, ppo_run: str, step: int) -> str:
    """The reward run scoring PPO run `ppo_run` after `step` steps (`Store.reward_history`)."""
    return reward_run_at(store.reward_history(ppo_run), step)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Put the global random streams back after side work between a run's steps (labeling pairs seed torch; a
    refit trains with its own seed): torch's on the CPU and every CUDA device, and Python's. A run with such
    work between its steps then draws what it would have drawn without, and resumes as it would have."""
    import torch

    python_state = random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)


def train_refit(workspace: Workspace, store: Store, reward_run: str, user_cfg: Config, hooks: RunHooks) -> RunResult:
    """Train a reward run on every label in the store with the settings of `reward_run`, the one now scoring the PPO
    run (same base, quantization and recipe: it loads onto the run's base as that one did)."""
    from .run_requests import StartReward, run_request

    return run_request(workspace, StartReward(config=config_of_run(store.run(reward_run), user_cfg)), hooks, store)


# In a PPO run's folder: the reward run another process asked it to switch to (`rlhf-tui refit`).
SWITCH_REQUEST_FILE = "reward-switch.json"


def request_reward_switch(run_dir: Path, reward_run: str) -> None:
    """Ask the PPO run of `run_dir`, trained by another process, to score with `reward_run` from its next
    checkpoint on. The request file is written whole or not at all (a rename)."""
    tmp = run_dir / f"{SWITCH_REQUEST_FILE}.tmp"
    tmp.write_text(json.dumps({"reward_run": reward_run}), encoding="utf-8")
    os.replace(tmp, run_dir / SWITCH_REQUEST_FILE)


def take_switch_request(run_dir: Path) -> str | None:
    """The reward run another process asked the PPO run of `run_dir` to switch to, once: the request is removed.
    None when there is none (or it cannot be read: `request_reward_switch` never leaves half a file)."""
    path = run_dir / SWITCH_REQUEST_FILE
    try:
        reward_run = json.loads(path.read_text(encoding="utf-8"))["reward_run"]
    except (OSError, ValueError, KeyError, TypeError):
        reward_run = None
    path.unlink(missing_ok=True)
    return reward_run if isinstance(reward_run, str) else None
