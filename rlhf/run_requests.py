"""The one way a reward or PPO run starts: a request record, run by `run_request`.

The app's screens send these records to the engine process, which runs them here; `rlhf-tui train-reward`
and `rlhf-tui ppo` build the same records from their flags and run them here too. Each record carries the
whole `Config` the run is to use (the app's, with the screen's form on top; the CLI's, with its flags on
top), so nobody re-reads rlhf.toml on the way.

No torch at import time: the app imports these records (through `rlhf.engine.protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, Workspace
from .distributed import SINGLE, Ranks
from .hooks import RunHooks, RunResult
from .store import Store


@dataclass(frozen=True)
class StartReward:
    """Train a reward model with `config`, or resume the stopped, failed or interrupted reward run
    `resume_run`, which keeps the settings it started with (`config` then only says whether remote code
    may run)."""

    config: Config
    resume_run: str | None = None


@dataclass(frozen=True)
class StartPPO:
    """Run PPO (or RLOO / GRPO: `config.ppo.algorithm`) against the finished reward run `reward_run` (None =
    the latest), or resume the PPO run `resume_run` with the settings and reward run it started with."""

    config: Config
    reward_run: str | None = None
    resume_run: str | None = None


RunRequest = StartReward | StartPPO


def run_request(workspace: Workspace, request: RunRequest, hooks: RunHooks | None = None,
                store: Store | None = None, ranks: Ranks = SINGLE) -> RunResult:
    """Run a reward or PPO request to its end in this process and say how it ended; `hooks` report progress
    and carry stop requests, `store` is the workspace's open store (None: the run opens its own), `ranks` this
    process's place in a data-parallel run (`rlhf-tui ... --processes N`; one process: `SINGLE`)."""
    if isinstance(request, StartReward):
        from .reward import train_reward

        return train_reward(workspace, request.config, hooks=hooks, store=store, resume_run=request.resume_run,
                            ranks=ranks)
    if isinstance(request, StartPPO):
        from .ppo import run_ppo

        return run_ppo(workspace, request.config, reward_run=request.reward_run, resume_run=request.resume_run,
                       hooks=hooks, store=store, ranks=ranks)
    raise TypeError(f"not a run request: {request!r}")
