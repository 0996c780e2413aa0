"""The schema of `rlhf.db` as forward migrations: `MIGRATIONS[i]` upgrades version i to i + 1 (the version lives in
`PRAGMA user_version`). A change to the schema is a new migration appended here, never an edit of an old one."""

from __future__ import annotations

from typing import Callable

import sqlite_utils

from ..run_rows import RUN_KINDS

CHOICES = ("a", "b", "tie", "both_bad", "skip")
# The statuses the first schema allows, as its migration wrote them (RunStatus names the same six).
RUN_STATUSES = ("running", "stopping", "finished", "stopped", "failed", "interrupted")


def _migrate_0_to_1(db: sqlite_utils.Database) -> None:
    db["prompts"].create({
        "id": int, "key": str, "text": str, "messages": str, "tags": str, "source": str, "created_at": str,
    }, pk="id", not_null={"key", "text", "created_at"})
    db["prompts"].create_index(["key"], unique=True)
    db["responses"].create({
        "id": int, "prompt_id": int, "text": str, "model": str, "adapter": str, "sampling": str,
        "seed": int, "prompt_tokens": int, "response_tokens": int, "finished": int, "source": str,
        "created_at": str,
    }, pk="id", foreign_keys=[("prompt_id", "prompts", "id")], not_null={"prompt_id", "text", "created_at"})
    db["responses"].create_index(["prompt_id"])
    db.execute(f"""
        CREATE TABLE comparisons (
            id INTEGER PRIMARY KEY,
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            response_a_id INTEGER NOT NULL REFERENCES responses(id),
            response_b_id INTEGER NOT NULL REFERENCES responses(id),
            choice TEXT NOT NULL CHECK (choice IN ({", ".join(repr(c) for c in CHOICES)})),
            margin REAL,
            annotator TEXT,
            note TEXT,
            decision_ms INTEGER,
            source TEXT,
            created_at TEXT NOT NULL
        )""")
    db["comparisons"].create_index(["prompt_id"])
    db.execute(f"""
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k) for k in RUN_KINDS)})),
            config TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in RUN_STATUSES)})),
            step INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER,
            started_at TEXT NOT NULL,
            ended_at TEXT,
            checkpoint TEXT,
            checkpoint_step INTEGER,
            error TEXT,
            pid INTEGER,
            parent_run TEXT REFERENCES runs(id)
        )""")
    db["metrics"].create({
        "id": int, "run_id": str, "step": int, "name": str, "value": float, "time": float,
    }, pk="id", foreign_keys=[("run_id", "runs", "id")], not_null={"run_id", "step", "name"})
    db["metrics"].create_index(["run_id", "step"])
    db["samples"].create({
        "id": int, "run_id": str, "step": int, "prompt_id": int, "prompt": str, "response": str,
        "score": float, "kl": float, "created_at": str,
    }, pk="id", foreign_keys=[("run_id", "runs", "id"), ("prompt_id", "prompts", "id")],
        not_null={"run_id", "step"})
    db["samples"].create_index(["run_id", "step"])


def _migrate_1_to_2(db: sqlite_utils.Database) -> None:
    # Which process is showing or queueing a prompt for labeling, so two sessions never serve it at once.
    db.execute("""
        CREATE TABLE prompt_claims (
            prompt_id INTEGER PRIMARY KEY REFERENCES prompts(id),
            owner_pid INTEGER NOT NULL,
            expires_at REAL NOT NULL
        )""")


def _migrate_2_to_3(db: sqlite_utils.Database) -> None:
    # A resumed run's running time: its earlier sessions' seconds, and when the current session began.
    db.execute("ALTER TABLE runs ADD COLUMN earlier_seconds REAL NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE runs ADD COLUMN session_started_at TEXT")


def _migrate_3_to_4(db: sqlite_utils.Database) -> None:
    # Label quality. repeat_of: a re-shown pair (sides swapped) points at the decision it repeats, for
    # self-consistency. response_scores: a reward run's score of a served answer; reward_run / reward_margin:
    # the comparison's pair as that run scored it (margin = preferred answer's score - the other's; > 0 agrees).
    db.execute("ALTER TABLE comparisons ADD COLUMN repeat_of INTEGER REFERENCES comparisons(id) ON DELETE SET NULL")
    db.execute("ALTER TABLE comparisons ADD COLUMN reward_run TEXT")
    db.execute("ALTER TABLE comparisons ADD COLUMN reward_margin REAL")
    db.execute("""
        CREATE TABLE response_scores (
            response_id INTEGER NOT NULL REFERENCES responses(id),
            reward_run TEXT NOT NULL REFERENCES runs(id),
            score REAL NOT NULL,
            PRIMARY KEY (response_id, reward_run)
        )""")


def _migrate_4_to_5(db: sqlite_utils.Database) -> None:
    # Blind evaluation: a session compares a PPO checkpoint (the candidate) with the reference or another
    # checkpoint on held-out prompts; each pair records which side the candidate's answer was shown on, and a
    # decision on it is a comparison pointing at its pair (left out of reward training and export by default).
    db.execute("""
        CREATE TABLE eval_sessions (
            id TEXT PRIMARY KEY,
            candidate TEXT NOT NULL,
            run_id TEXT NOT NULL REFERENCES runs(id),
            checkpoint_step INTEGER NOT NULL,
            opponent TEXT NOT NULL,
            opponent_run TEXT REFERENCES runs(id),
            opponent_step INTEGER,
            prompt_tag TEXT,
            seed INTEGER NOT NULL,
            model TEXT,
            sampling TEXT,
            created_at TEXT NOT NULL
        )""")
    db.execute("""
        CREATE TABLE eval_pairs (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES eval_sessions(id),
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            response_a_id INTEGER NOT NULL REFERENCES responses(id),
            response_b_id INTEGER NOT NULL REFERENCES responses(id),
            candidate_side TEXT NOT NULL CHECK (candidate_side IN ('a', 'b'))
        )""")
    db.execute("CREATE INDEX eval_pairs_session ON eval_pairs (session_id)")
    db.execute("ALTER TABLE comparisons ADD COLUMN eval_pair_id INTEGER REFERENCES eval_pairs(id)")


def _migrate_5_to_6(db: sqlite_utils.Database) -> None:
    # Labeling during runs. run_id / run_step: the run whose policy sampled an answer (a PPO run, between its
    # steps) and after how many steps; run_checkpoint: that run's latest checkpoint then (the state to resume
    # and step forward from). A comparison copies its pair's run and step, by trigger, whoever writes it (both
    # answers of a pair come from one generate call). run_rewards: the reward runs a PPO run switched to (a
    # refit) and the step after which each one scores; before the first, the run's parent_run does.
    for table in ("responses", "comparisons"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN run_id TEXT REFERENCES runs(id)")
        db.execute(f"ALTER TABLE {table} ADD COLUMN run_step INTEGER")
    db.execute("ALTER TABLE responses ADD COLUMN run_checkpoint TEXT")
    db.execute("""
        CREATE TRIGGER comparisons_run_provenance AFTER INSERT ON comparisons WHEN NEW.run_id IS NULL
        BEGIN
            UPDATE comparisons SET (run_id, run_step) = (
                SELECT run_id, run_step FROM responses WHERE id = NEW.response_a_id) WHERE id = NEW.id;
        END""")
    db.execute("""
        CREATE TABLE run_rewards (
            run_id TEXT NOT NULL REFERENCES runs(id),
            from_step INTEGER NOT NULL,
            reward_run TEXT NOT NULL REFERENCES runs(id),
            created_at TEXT NOT NULL,
            PRIMARY KEY (run_id, from_step)
        )""")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migrate_0_to_1, _migrate_1_to_2, _migrate_2_to_3,
                                                             _migrate_3_to_4, _migrate_4_to_5, _migrate_5_to_6]
SCHEMA_VERSION = len(MIGRATIONS)
