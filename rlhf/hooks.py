"""How a training run talks to whoever started it, without knowing who that is.

`train_reward` and `run_ppo` write runs/metrics/samples to the store (through their `runs.RunSession`), and call a
`RunHooks`: the headless CLI draws a progress bar and turns Ctrl+C into `should_stop`; the engine
process forwards each call to the app as a protocol event and sets `should_stop` on a Stop message.
No torch here: the app's side imports it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from .run_rows import RunStatus


@dataclass
class RunResult:
    """How a run ended: a final status (finished, stopped, failed, interrupted), a one-line message, the
    checkpoint or model it left, and the steps it did."""

    run_id: str
    status: RunStatus
    message: str = ""
    checkpoint: str | None = None
    step: int = 0


class RunHooks:
    """Callbacks from a training loop; the defaults do nothing and never stop."""

    # A database file deleted while the run trains is written back at its next checkpoint (RunSession). Not in
    # the app's engine: the app writes it back itself, as only it can then restart the engine onto the new file.
    writes_back_database = True

    def __init__(self) -> None:
        self.stop_requested = threading.Event()

    def should_stop(self) -> bool:
        """Polled between steps (and between batches); True ends the run gracefully with a checkpoint."""
        return self.stop_requested.is_set()

    def on_start(self, run_id: str, kind: str, total_steps: int, start_step: int = 0) -> None:
        pass

    def on_step(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_samples(self, run_id: str, step: int, samples: list[dict[str, Any]]) -> None:
        pass

    def on_checkpoint(self, run_id: str, step: int, path: str) -> None:
        pass

    def on_warning(self, run_id: str, message: str) -> None:
        pass

    def on_policy(self, run_id: str, model: Any, tokenizer: Any) -> None:
        """A PPO run's live policy (its PeftModel, the policy adapter active) and tokenizer, once built: the engine
        samples labeling pairs from it between steps."""

    def on_reward(self, run_id: str, reward_run: str, reward: Any) -> None:
        """The reward scoring a PPO run's steps from now on (reward run `reward_run`, PPO's `RolloutScorer`): after
        `on_policy`, and again after each switch to a refit. The engine judges the pairs it samples between steps
        with it."""

    def take_reward_switch(self, run_id: str, step: int) -> str | None:
        """Polled after each PPO checkpoint: a finished reward run (a refit) to score the steps after `step` with,
        or None to keep the reward."""
        return None

    def on_reward_switch(self, run_id: str, step: int, reward_run: str, error: str | None) -> None:
        """After the run tried to switch to `reward_run` at checkpoint `step`: `error` None when it did, else why
        it keeps its reward."""
