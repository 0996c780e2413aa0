"""Runs as the store returns them: a `Run` row and its `RunStatus`. Nothing heavy here: the app, the CLI and the
core read them alike."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime
from enum import Enum
from typing import Any

RUN_KINDS = ("reward", "ppo")


class RunStatus(str, Enum):
    """Where a run stands. A str, so that it compares with, stores and prints as its value ("finished")."""

    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        """The run is over (finished, stopped, failed or interrupted)."""
        return self not in ACTIVE_STATUSES

    @property
    def can_resume(self) -> bool:
        """A run left here may go on from its last checkpoint."""
        return self in RESUMABLE_STATUSES


ACTIVE_STATUSES = (RunStatus.RUNNING, RunStatus.STOPPING)  # a process is (or was, if it died) running it
FINAL_STATUSES = tuple(status for status in RunStatus if status not in ACTIVE_STATUSES)
RESUMABLE_STATUSES = (RunStatus.STOPPED, RunStatus.FAILED, RunStatus.INTERRUPTED)


@dataclass(frozen=True)
class Run:
    """One row of the `runs` table, its config decoded."""

    id: str
    kind: str  # one of RUN_KINDS
    config: dict[str, Any]
    status: RunStatus
    step: int
    total_steps: int | None
    started_at: str
    ended_at: str | None
    checkpoint: str | None  # the last checkpoint's folder; a reward run's model once it ended
    checkpoint_step: int | None
    error: str | None
    pid: int | None
    parent_run: str | None  # a PPO run's reward run
    earlier_seconds: float  # time it ran in sessions before the current one (see run_seconds)
    session_started_at: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Run:
        """The Run of a `runs` row as SQLite returns it (columns a later schema adds are left out)."""
        values = {field.name: row[field.name] for field in fields(cls)}
        return cls(**{**values, "config": json.loads(row["config"]), "status": RunStatus(row["status"])})

    @property
    def timing(self) -> RunTiming:
        return RunTiming(self.started_at, self.ended_at, self.session_started_at, self.earlier_seconds)

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON-ready values (the status as its string)."""
        return {field.name: getattr(self, field.name) for field in fields(self)} | {"status": self.status.value}


@dataclass(frozen=True)
class RunTiming:
    """The columns of a run's row that say how long it has run (see run_seconds)."""

    started_at: str
    ended_at: str | None = None
    session_started_at: str | None = None
    earlier_seconds: float = 0.0


def run_seconds(run: RunTiming | Run, now: datetime) -> float:
    """How long a run has been running: its earlier sessions, plus the current (or last) session from its
    start to its end, or to `now` while it runs. A resumed run's stopped time does not count."""
    session_start = datetime.fromisoformat(run.session_started_at or run.started_at)
    end = datetime.fromisoformat(run.ended_at) if run.ended_at else now
    return run.earlier_seconds + max(0.0, (end - session_start).total_seconds())
