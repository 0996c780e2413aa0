"""Runs (typed `Run` rows), their metrics, samples and reward switches."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone
from typing import Any


from ..errors import StoreError
from ..run_rows import FINAL_STATUSES, RUN_KINDS, Run, RunStatus, run_seconds
from .connection import Connection, _pid_alive, now_iso


def new_run_id(kind: str) -> str:
    """A fresh run id: kind, local date and time, 4 random hex digits (`reward-20250101-120000-ab12`)."""
    return f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


class RunQueries(Connection):
    """Run rows, metrics, samples."""

    # -- runs, metrics, samples --------------------------------------------------------------

    def create_run(self, kind: str, config: dict[str, Any], *, total_steps: int | None = None,
                   parent_run: str | None = None, run_id: str | None = None) -> str:
        if kind not in RUN_KINDS:
            raise StoreError(f"run kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")
        run_id = run_id or new_run_id(kind)
        with self.transaction():
            self.db.execute(
                """INSERT INTO runs (id, kind, config, status, step, total_steps, started_at, pid, parent_run)
                   VALUES (?, ?, ?, 'running', 0, ?, ?, ?, ?)""",
                [run_id, kind, json.dumps(config), total_steps, now_iso(), os.getpid(), parent_run])
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        allowed = {"status", "step", "total_steps", "checkpoint", "checkpoint_step", "error", "pid", "ended_at"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update run fields {sorted(unknown)}")
        if "status" in fields:
            fields["status"] = RunStatus(fields["status"])  # a ValueError names a bad one
        if fields.get("status") in FINAL_STATUSES and "ended_at" not in fields:
            fields["ended_at"] = now_iso()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction():
            self.db.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*fields.values(), run_id])

    def resume_run(self, run_id: str, from_step: int) -> None:
        """Mark a stopped/failed/interrupted run as running again in this process from its checkpoint's step:
        rows logged past that step are dropped (the resumed run computes them again), and the time it ran
        so far is kept in earlier_seconds (the time it stood still does not count)."""
        with self.transaction():
            ran = run_seconds(self.run(run_id), datetime.now(timezone.utc))
            self.db.execute("UPDATE runs SET status = 'running', ended_at = NULL, error = NULL, pid = ?, step = ?, "
                            "earlier_seconds = ?, session_started_at = ? WHERE id = ?",
                            [os.getpid(), from_step, ran, now_iso(), run_id])
            self.db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [run_id, from_step])
            self.db.execute("DELETE FROM samples WHERE run_id = ? AND step > ?", [run_id, from_step])

    def run(self, run_id: str) -> Run:
        rows = self._query("SELECT * FROM runs WHERE id = ?", [run_id])
        if not rows:
            raise StoreError(f"no run {run_id!r} (see `rlhf-tui runs`)")
        return Run.from_row(rows[0])

    def runs(self, kind: str | None = None) -> list[Run]:
        """The runs (of one kind), oldest first."""
        sql, params = "SELECT * FROM runs", []
        if kind:
            sql += " WHERE kind = ?"
            params.append(kind)
        return [Run.from_row(r) for r in self._query(sql + " ORDER BY started_at, rowid", params)]

    def latest_run(self, kind: str, status: RunStatus = RunStatus.FINISHED) -> Run | None:
        rows = self._query("SELECT * FROM runs WHERE kind = ? AND status = ? ORDER BY started_at DESC, rowid DESC "
                           "LIMIT 1", [kind, status])
        return Run.from_row(rows[0]) if rows else None

    def finished_reward_runs(self) -> list[Run]:
        """The reward runs PPO may use, newest first: the first is the default of `finished_reward_run`."""
        return [Run.from_row(r) for r in self._query(
            "SELECT * FROM runs WHERE kind = 'reward' AND status = ? ORDER BY started_at DESC, rowid DESC",
            [RunStatus.FINISHED])]

    def finished_reward_run(self, run_id: str | None = None) -> Run:
        """The named reward run of this database, or the latest finished one; it must be a finished reward run
        (what PPO, `score`, `export-reward` and the Train screen use: a name that is not a run here is refused,
        never a path)."""
        if run_id is None:
            runs = self.finished_reward_runs()
            if not runs:
                raise StoreError("no finished reward run: train one with `rlhf-tui train-reward`")
            return runs[0]
        run = self.run(run_id)
        if run.kind != "reward" or run.status != RunStatus.FINISHED:
            raise StoreError(f"run {run_id!r} is a {run.status} {run.kind} run, not a finished reward run "
                             "(see `rlhf-tui runs`)")
        return run

    def mark_interrupted_runs(self) -> list[str]:
        """Runs left 'running' by a process that no longer exists become 'interrupted'."""
        marked = []
        for run in self._query("SELECT id, pid FROM runs WHERE status IN ('running', 'stopping')"):
            if run["pid"] is None or not _pid_alive(run["pid"]):
                self.update_run(run["id"], status="interrupted",
                                error="the process running it ended without saying why (killed or crashed)")
                marked.append(run["id"])
        return marked

    def log_metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        t = time.time()
        with self.transaction():
            self.db.conn.executemany(
                "INSERT INTO metrics (run_id, step, name, value, time) VALUES (?, ?, ?, ?, ?)",
                [(run_id, step, name, float(value), t) for name, value in values.items()])

    def metrics(self, run_id: str, name: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT step, name, value, time FROM metrics WHERE run_id = ?", [run_id]
        if name:
            sql += " AND name = ?"
            params.append(name)
        return self._query(sql + " ORDER BY step, id", params)

    def metrics_by_step(self, run_id: str, after_step: int = -1) -> dict[int, dict[str, float]]:
        """{step: {name: value}} for steps after `after_step` (for following a live run)."""
        out: dict[int, dict[str, float]] = {}
        for r in self._query("SELECT step, name, value FROM metrics WHERE run_id = ? AND step > ? ORDER BY step, id",
                             [run_id, after_step]):
            out.setdefault(r["step"], {})[r["name"]] = r["value"]
        return out

    def add_samples(self, run_id: str, step: int, rows: list[dict[str, Any]]) -> None:
        created = now_iso()
        with self.transaction():
            self.db.conn.executemany(
                "INSERT INTO samples (run_id, step, prompt_id, prompt, response, score, kl, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, step, r.get("prompt_id"), r["prompt"], r["response"], r.get("score"), r.get("kl"), created)
                 for r in rows])

    def samples(self, run_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM samples WHERE run_id = ? ORDER BY step DESC, id DESC", [run_id]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self._query(sql, params)

    def add_reward_switch(self, run_id: str, reward_run: str, from_step: int) -> None:
        """Record that PPO run `run_id` scores its steps after `from_step` with `reward_run` (a refit)."""
        with self.transaction():
            self.db.execute("INSERT INTO run_rewards (run_id, from_step, reward_run, created_at) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (run_id, from_step) DO UPDATE SET reward_run = excluded.reward_run",
                            [run_id, from_step, reward_run, now_iso()])

    def reward_history(self, run_id: str) -> list[dict[str, Any]]:
        """The reward runs that score a PPO run, oldest first, as {from_step, reward_run}: the one it started with
        (from step 0), then each it switched to after a checkpoint (a refit)."""
        return self._query("SELECT 0 AS from_step, parent_run AS reward_run FROM runs WHERE id = ? "
                           "UNION ALL SELECT from_step, reward_run FROM run_rewards WHERE run_id = ? "
                           "ORDER BY from_step", [run_id, run_id])

