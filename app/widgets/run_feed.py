"""What a run's panes show, gathered from engine events or from the database, and the figures derived from it.

Both sources produce `RunUpdate`s: `update_from_event` turns one engine event into one, `DbFollower.poll`
reads what the store gained since its last poll. `RunFeed.apply` merges them idempotently per step, so
a view can load a run from the DB and continue from events, or follow the DB alone (a run started
headless in another terminal), through one code path. No Textual here: everything is testable as is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from rlhf.engine import protocol
from rlhf.run_rows import FINAL_STATUSES, Run, RunTiming, run_seconds
from rlhf.store import Store

from .answer import visible_text

SAMPLES_KEPT = 40  # newest sample generations held for the samples pane
ETA_WINDOW = 10  # step arrivals the ETA averages over: recent speed, not the run's whole history


@dataclass
class RunUpdate:
    """New facts about one run; None / empty means "nothing new about this"."""

    steps: dict[int, dict[str, float]] = field(default_factory=dict)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    status: str | None = None
    step: int | None = None
    total_steps: int | None = None
    checkpoint_step: int | None = None
    message: str | None = None
    timing: RunTiming | None = None  # for how long it has run
    config: dict[str, Any] | None = None
    reset: bool = False  # the run restarted from a checkpoint: what was shown past it is void


def update_from_event(event: protocol.Event) -> RunUpdate | None:
    """The run facts an engine event carries, or None for events that are not about a run's progress."""
    if isinstance(event, protocol.RunStarted):
        return RunUpdate(status="running", step=event.start_step, total_steps=event.total_steps)
    if isinstance(event, protocol.RunStep):
        return RunUpdate(steps={event.step: dict(event.metrics)}, step=event.step)
    if isinstance(event, protocol.RunSamples):
        return RunUpdate(samples={event.step: [dict(s, step=event.step) for s in event.samples]})
    if isinstance(event, protocol.RunCheckpoint):
        return RunUpdate(checkpoint_step=event.step)
    if isinstance(event, protocol.RunEnded):
        return RunUpdate(status=event.result.status, message=event.result.message or None)
    return None


def update_from_row(run: Run) -> RunUpdate:
    """The facts of a `runs` row."""
    return RunUpdate(status=run.status, step=run.step, total_steps=run.total_steps,
                     checkpoint_step=run.checkpoint_step, message=run.error,
                     timing=run.timing, config=run.config)


class DbFollower:
    """Reads a run's progress from the store, each poll returning only what is new since the last one."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.last_step = -1
        self.last_sample_step = -1
        self.last_status: str | None = None

    def poll(self) -> RunUpdate:
        run = self.store.run(self.run_id)
        update = update_from_row(run)
        # A stopped run that runs again was resumed from its checkpoint: the steps after it are recomputed.
        if self.last_status in FINAL_STATUSES and run.status not in FINAL_STATUSES:
            update.reset = True
            self.last_step = self.last_sample_step = -1
        self.last_status = run.status
        # The last step is read again: a reward run logs its held-out metrics under a step already logged.
        update.steps = self.store.metrics_by_step(self.run_id, after_step=self.last_step - 1)
        if update.steps:
            self.last_step = max(update.steps)
        for row in reversed(self.store.samples(self.run_id, limit=SAMPLES_KEPT)):
            if row["step"] > self.last_sample_step:
                update.samples.setdefault(row["step"], []).append(row)
        if update.samples:
            self.last_sample_step = max(update.samples)
        return update


class RunFeed:
    """Everything the panes of one run show, merged from any number of updates."""

    def __init__(self, run_id: str | None = None, kind: str | None = None) -> None:
        self.run_id, self.kind = run_id, kind
        self.status: str | None = None
        self.step = 0
        self.total_steps: int | None = None
        self.checkpoint_step: int | None = None
        self.message: str | None = None
        self.timing: RunTiming | None = None
        self.config: dict[str, Any] = {}
        self.metrics: dict[int, dict[str, float]] = {}
        self.samples: list[dict[str, Any]] = []  # newest first
        self.arrivals: list[tuple[int, float]] = []  # (step, monotonic time it was first seen)
        self.warnings: list[str] = []
        self.version = 0  # changes with every applied update: views redraw when it moved

    def apply(self, update: RunUpdate, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if update.reset:
            self.metrics, self.samples, self.arrivals, self.message = {}, [], [], None
        for step, values in update.steps.items():
            self.metrics.setdefault(step, {}).update(values)
        sample_steps = {s["step"] for s in self.samples}
        fresh = [s for step in sorted(update.samples, reverse=True) if step not in sample_steps
                 for s in update.samples[step]]
        self.samples = sorted(fresh + self.samples, key=lambda s: s["step"], reverse=True)[:SAMPLES_KEPT]
        for name in ("status", "total_steps", "checkpoint_step", "message", "timing", "config"):
            value = getattr(update, name)
            if value is not None:
                setattr(self, name, value)
        reached = max([*update.steps, *([] if update.step is None else [update.step])], default=None)
        if reached is not None and (update.reset or reached >= self.step):
            self.step = reached
            if not self.arrivals or reached > self.arrivals[-1][0]:
                self.arrivals = [*self.arrivals[-(ETA_WINDOW - 1):], (reached, now)]
        self.version += 1

    def add_warning(self, message: str) -> None:
        self.warnings.append(message)
        self.version += 1

    def latest(self, name: str) -> float | None:
        """The value of `name` at the last step that logged it."""
        for step in sorted(self.metrics, reverse=True):
            if name in self.metrics[step]:
                return self.metrics[step][name]
        return None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


# -- derived figures -------------------------------------------------------------------------------


def seconds_per_step(arrivals: Sequence[tuple[int, float]]) -> float | None:
    """Mean wall time per step between the first and the last (step, time) arrival; None before two."""
    if len(arrivals) < 2 or arrivals[-1][0] == arrivals[0][0]:
        return None
    (first_step, first_time), (last_step, last_time) = arrivals[0], arrivals[-1]
    return (last_time - first_time) / (last_step - first_step)


def eta_seconds(per_step: float | None, step: int, total_steps: int | None) -> float | None:
    """Time left: seconds per step times the steps still to run; None when either is unknown."""
    if per_step is None or total_steps is None:
        return None
    return per_step * max(0, total_steps - step)


def elapsed_seconds(timing: RunTiming | None, now: datetime) -> float | None:
    """How long the run has been running (not counting time stopped before a resume); None before its row is read."""
    return None if timing is None else run_seconds(timing, now)


def format_duration(seconds: float | None) -> str:
    """h:mm:ss or m:ss; an en dash when unknown."""
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def status_line(feed: RunFeed, now: datetime | None = None, notice: str | None = None) -> str:
    """The first status row: state, how far, how long, the last checkpoint (the run id is in the title)."""
    if feed.run_id is None:
        return notice or "no run yet"
    now = now or datetime.now(timezone.utc)
    total = feed.total_steps if feed.total_steps is not None else "?"
    parts = [notice or feed.status or "?", f"step {feed.step}/{total}",
             f"elapsed {format_duration(elapsed_seconds(feed.timing, now))}"]
    if not feed.final:
        eta = eta_seconds(seconds_per_step(feed.arrivals), feed.step, feed.total_steps)
        parts.append(f"ETA {format_duration(eta)}")
    if feed.checkpoint_step:
        parts.append(f"checkpoint at {feed.checkpoint_step}")
    return " · ".join(parts)


def detail_line(feed: RunFeed) -> str:
    """The second status row: how the run ended (if it did), the latest warning, then its speed or accuracy."""
    parts = [feed.message] if feed.message else []
    if feed.warnings:
        parts.append(f"⚠ {feed.warnings[-1]}")
    if feed.run_id is not None:
        parts += _ppo_figures(feed) if feed.kind == "ppo" else _reward_figures(feed)
    return " · ".join(parts)


def _ppo_figures(feed: RunFeed) -> list[str]:
    parts = []
    tokens_per_s = feed.latest("tokens_per_s")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:.0f} tok/s")
    phases = [(label, feed.latest(f"time_{label}")) for label in ("rollout", "score", "train")]
    if any(seconds is not None for _, seconds in phases):
        parts.append(" ".join(f"{label} {seconds:.2f}s" for label, seconds in phases if seconds is not None))
    return parts


def _reward_figures(feed: RunFeed) -> list[str]:
    parts = []
    epoch, epochs = feed.latest("epoch"), feed.config.get("reward", {}).get("epochs")
    if epoch is not None:
        parts.append(f"epoch {epoch:.2f}/{epochs if epochs is not None else '?'}")
    parts.append(f"held-out acc {format_number(feed.latest('heldout_acc'))}")
    return parts


def samples_text(samples: Sequence[dict[str, Any]]) -> str:
    """Sample generations newest first: a header with step, score and KL, then the prompt and the response."""
    if not samples:
        return "no samples yet: they arrive with each PPO step"
    blocks = []
    for s in samples:
        header = f"step {s['step']} · score {format_number(s.get('score'))} · KL {format_number(s.get('kl'))}"
        blocks.append(f"{header}\n> {visible_text(s['prompt'])}\n{visible_text(s['response']).strip()}")
    return "\n\n".join(blocks)
