"""The workspace's SQLite store: prompts, responses, comparisons, runs, metrics, samples.

One file (`rlhf.db`) shared by the app, the engine process and headless commands: WAL mode so
readers never block the writer, a busy timeout so two writers wait for each other instead of failing,
foreign keys on, and every write committed when it is made (a label is on disk before the next pair
is shown). The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` upgrades i -> i + 1.

This package imports no torch: the app uses it directly. The queries live by family in `labels`, `evals` and
`runs`, on the connection of `connection`; the migrations in `schema`. `Store` joins them: import it (and the
names below) from `rlhf.store`.
"""

from __future__ import annotations

from typing import Any

from .connection import DEFAULT_BUSY_TIMEOUT_S, PROMPT_CLAIM_TTL_S, _pid_alive, now_iso
from .evals import EvalQueries
from .labels import PromptItem
from .runs import RunQueries, new_run_id
from .schema import CHOICES, RUN_STATUSES, SCHEMA_VERSION

__all__ = ["CHOICES", "DEFAULT_BUSY_TIMEOUT_S", "PROMPT_CLAIM_TTL_S", "RUN_STATUSES", "SCHEMA_VERSION", "PromptItem",
           "Store", "_pid_alive", "new_run_id", "now_iso"]


class Store(EvalQueries, RunQueries):
    """Queries over one workspace database. One instance per thread (sqlite3's rule)."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- summary -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        one = lambda sql: self._query(sql)[0]["n"]  # noqa: E731
        by_choice = {c: 0 for c in CHOICES}
        for r in self._query("SELECT choice, COUNT(*) AS n FROM comparisons GROUP BY choice"):
            by_choice[r["choice"]] = r["n"]
        runs = {f"{r['kind']}:{r['status']}": r["n"] for r in
                self._query("SELECT kind, status, COUNT(*) AS n FROM runs GROUP BY kind, status")}
        return {
            "prompts": one("SELECT COUNT(*) AS n FROM prompts"),
            "responses": one("SELECT COUNT(*) AS n FROM responses"),
            "comparisons": sum(by_choice.values()),
            "by_choice": by_choice,
            "runs": runs,
        }

