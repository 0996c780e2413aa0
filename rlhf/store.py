"""The workspace's SQLite store: prompts, responses, comparisons, runs, metrics, samples.

One file (`rlhf.db`) shared by the app, the engine process and headless commands: WAL mode so
readers never block the writer, a busy timeout so two writers wait for each other instead of failing,
foreign keys on, and every write committed when it is made (a label is on disk before the next pair
is shown). The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` upgrades i -> i + 1.

This module imports no torch: the app uses it directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import sqlite_utils

from .agreement import reward_margin
from .errors import StoreError
from .run_rows import FINAL_STATUSES, RUN_KINDS, Run, RunStatus, run_seconds

CHOICES = ("a", "b", "tie", "both_bad", "skip")
# The statuses the first schema allows, as its migration wrote them (RunStatus names the same six).
RUN_STATUSES = ("running", "stopping", "finished", "stopped", "failed", "interrupted")
DEFAULT_BUSY_TIMEOUT_S = 10.0
# A labeling session renews its prompt claims whenever it asks for a pair, and the claims of a process that
# has ended lapse at once (no release needed): the expiry only guards against a pid reused by another process.
PROMPT_CLAIM_TTL_S = 3600.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class PromptItem:
    """A prompt to import: plain text, or chat messages (then `text` is the last user turn)."""

    text: str
    messages: list[dict[str, str]] | None = None
    tags: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Identity used to skip duplicates: the text, or the whole conversation."""
        content = json.dumps(self.messages, sort_keys=True) if self.messages else self.text.strip()
        return hashlib.sha256(content.encode("utf-8")).hexdigest()


def new_run_id(kind: str) -> str:
    """A fresh run id: kind, local date and time, 4 random hex digits (`reward-20250101-120000-ab12`)."""
    return f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


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


class Store:
    """Queries over one workspace database. One instance per thread (sqlite3's rule)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, expected a database file")
        if not self.path.parent.is_dir():
            raise StoreError(f"{self.path.parent}: workspace directory does not exist")
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            # SQLite would open it read-only without a word and fail at the first label instead.
            raise StoreError(f"{self.path}: read-only file (make it writable, or choose another --workspace)")
        self._in_transaction = False
        with self._errors("open"):
            conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s)
        try:
            self.db = sqlite_utils.Database(conn)
            with self._errors("open"):
                self._configure()
                self._migrate()
        except BaseException:
            conn.close()
            raise
        self._file_identity = _file_identity(self.path)

    # -- connection --------------------------------------------------------------------------

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn sqlite's exceptions into one-line StoreErrors that say what to do."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            if "file is not a database" in msg or "malformed" in msg:
                hint = "not a SQLite database (move it away or choose another --workspace)"
            elif "readonly" in msg or "unable to open" in msg or "disk I/O" in msg:
                hint = "cannot write here (check permissions, or choose another --workspace)"
            elif "locked" in msg or "busy" in msg:
                hint = (f"database is locked by another process for more than {self.busy_timeout_s:g}s "
                        "(close the other writer and retry)")
            elif "database or disk is full" in msg:
                hint = "disk is full (free some space; this write was not saved)"
            else:
                hint = msg
            raise StoreError(f"{self.path}: {action}: {hint}") from None

    def _configure(self) -> None:
        self.db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: could not switch to WAL mode (got {mode})")
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA synchronous = NORMAL")

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: database schema v{version} is newer than this rlhf-tui (v{SCHEMA_VERSION}); "
                "upgrade rlhf-tui")
        for target in range(version, SCHEMA_VERSION):
            # The write lock is taken first: two processes opening a fresh DB at once must not both migrate it.
            with self.transaction():
                if self.schema_version == target:
                    MIGRATIONS[target](self.db)
                    self.db.execute(f"PRAGMA user_version = {target + 1}")

    def close(self) -> None:
        self.db.close()

    def still_on_disk(self) -> bool:
        """Whether the file this connection opened is still the one at `path` (not deleted, not replaced)."""
        return _file_identity(self.path) == self._file_identity

    def restore_to_disk(self) -> Path:
        """Write this connection's whole database back after its file was deleted (the connection still holds
        the deleted file open, so nothing is lost) and go on in the restored file; returns its path.

        A file that took the database's place is left alone: the database is saved next to it and a
        StoreError says where.
        """
        taken = self.path.exists()
        target = self.path.with_name(f"{self.path.name}.recovered-{int(time.time())}") if taken else self.path
        temp = target.with_name(target.name + ".tmp")
        try:
            with self._errors("restore"):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                copy = sqlite3.connect(str(temp))
                try:
                    self.db.conn.backup(copy)
                finally:
                    copy.close()
                if not taken:
                    for stale in (f"{self.path}-wal", f"{self.path}-shm"):  # the deleted file's: never replay them
                        Path(stale).unlink(missing_ok=True)
                os.replace(temp, target)
        except OSError as exc:
            raise StoreError(f"{target}: cannot write the database back: {exc.strerror or exc} (keep the app open, "
                             "free the disk or fix the folder, then label again)") from None
        if taken:
            raise StoreError(f"{self.path}: another file took the database's place while it was open: saved the "
                             f"database to {target.name} (move the other file away, then rename it back)")
        self.db.close()
        with self._errors("open"):
            self.db = sqlite_utils.Database(sqlite3.connect(str(self.path), timeout=self.busy_timeout_s))
            self._configure()
        self._file_identity = _file_identity(self.path)
        return self.path

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all; a nested call joins the outer transaction.

        BEGIN IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a
        read-then-write inside cannot be overtaken by another process. An explicit BEGIN is needed
        anyway: sqlite-utils commits any write made outside an open transaction at once.
        """
        if self._in_transaction:
            yield
            return
        with self._errors("write"):
            self.db.conn.execute("BEGIN IMMEDIATE")
            self._in_transaction = True
            try:
                yield
                self.db.conn.execute("COMMIT")
            except BaseException:
                if self.db.conn.in_transaction:
                    self.db.conn.execute("ROLLBACK")
                raise
            finally:
                self._in_transaction = False

    def _query(self, sql: str, params: Iterable[Any] | dict = ()) -> list[dict[str, Any]]:
        with self._errors("read"):
            return list(self.db.query(sql, params))

    # -- prompts -----------------------------------------------------------------------------

    def add_prompts(self, items: list[PromptItem], source: str) -> tuple[list[int], int]:
        """Insert prompts not already present (by key), in one transaction.

        Returns (ids of every item, new or existing, in input order; count of duplicates skipped).
        """
        ids: list[int] = []
        duplicates = 0
        created = now_iso()
        with self.transaction():
            for item in items:
                key = item.key
                row = self.db.execute("SELECT id FROM prompts WHERE key = ?", [key]).fetchone()
                if row:
                    duplicates += 1
                    ids.append(row[0])
                    continue
                cur = self.db.execute(
                    "INSERT INTO prompts (key, text, messages, tags, source, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [key, item.text, json.dumps(item.messages) if item.messages else None,
                     json.dumps(item.tags) if item.tags else None, source, created])
                ids.append(cur.lastrowid)
        return ids, duplicates

    def prompts(self, tag: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM prompts"
        params: list[Any] = []
        if tag:
            sql += " WHERE EXISTS (SELECT 1 FROM json_each(prompts.tags) WHERE value = ?)"
            params.append(tag)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_decode_prompt(r) for r in self._query(sql, params)]

    def prompt(self, prompt_id: int) -> dict[str, Any]:
        rows = self._query("SELECT * FROM prompts WHERE id = ?", [prompt_id])
        if not rows:
            raise StoreError(f"no prompt with id {prompt_id}")
        return _decode_prompt(rows[0])

    def prompt_order_for_labeling(self, seed: int, exclude: Iterable[int] = ()) -> list[int]:
        """Prompt ids to label next: unlabeled first, then least-labeled; ties shuffled by seed.

        Skips count as looked at, so a skipped prompt moves behind the ones nobody has seen.
        """
        rows = self._query("""
            SELECT p.id, COUNT(c.id) AS n FROM prompts p LEFT JOIN comparisons c ON c.prompt_id = p.id
            GROUP BY p.id""")
        excluded = set(exclude)
        rng = random.Random(seed)
        shuffled = [r for r in rows if r["id"] not in excluded]
        rng.shuffle(shuffled)
        shuffled.sort(key=lambda r: r["n"])  # stable: keeps the shuffle within each count
        return [r["id"] for r in shuffled]

    def claim_next_prompt(self, seed: int, held: Iterable[int] = (), *,
                          ttl_s: float = PROMPT_CLAIM_TTL_S) -> int | None:
        """The next prompt to label, claimed for this process so that another session labeling the same
        workspace is not served it at the same time; None when there are no prompts.

        `held` are the prompts this process's session shows or queues: their claims are renewed and its
        other claims released (decided or dropped). Preference: a prompt in nobody's hands (in
        `prompt_order_for_labeling` order); else one this session holds (a repeat, when everything is
        queued); else one another session holds. Claims of processes that are gone do not count.
        """
        owner, now, held = os.getpid(), time.time(), set(held)
        claim = ("INSERT INTO prompt_claims (prompt_id, owner_pid, expires_at) VALUES (?, ?, ?) "
                 "ON CONFLICT (prompt_id) DO UPDATE SET expires_at = excluded.expires_at "
                 "WHERE owner_pid = excluded.owner_pid")
        with self.transaction():  # the write lock first: two sessions cannot pick the same free prompt
            others = set()
            for row in self._query("SELECT prompt_id, owner_pid, expires_at FROM prompt_claims"):
                mine = row["owner_pid"] == owner
                lapsed = row["expires_at"] < now or (not mine and not _pid_alive(row["owner_pid"]))
                if lapsed or (mine and row["prompt_id"] not in held):
                    self.db.execute("DELETE FROM prompt_claims WHERE prompt_id = ?", [row["prompt_id"]])
                elif not mine:
                    others.add(row["prompt_id"])
            order = (self.prompt_order_for_labeling(seed, exclude=held | others)
                     or self.prompt_order_for_labeling(seed, exclude=others)
                     or self.prompt_order_for_labeling(seed))
            chosen = order[0] if order else None
            claimed = held if chosen is None else held | {chosen}
            self.db.conn.executemany(claim, [(prompt_id, owner, now + ttl_s) for prompt_id in claimed])
        return chosen

    # -- responses ---------------------------------------------------------------------------

    def add_response(self, prompt_id: int, text: str, *, model: str | None, adapter: str | None = None,
                     sampling: dict[str, Any] | None = None, seed: int | None = None,
                     prompt_tokens: int | None = None, response_tokens: int | None = None,
                     finished: bool | None = None, source: str = "generated", run_id: str | None = None,
                     run_step: int | None = None, run_checkpoint: str | None = None) -> int:
        """Store one answer; `run_id`, `run_step` and `run_checkpoint` name a run's policy that sampled it
        between the run's steps (None: the labeling model)."""
        with self.transaction():
            cur = self.db.execute(
                """INSERT INTO responses (prompt_id, text, model, adapter, sampling, seed, prompt_tokens,
                   response_tokens, finished, source, created_at, run_id, run_step, run_checkpoint)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [prompt_id, text, model, adapter, json.dumps(sampling) if sampling is not None else None, seed,
                 prompt_tokens, response_tokens, None if finished is None else int(finished), source, now_iso(),
                 run_id, run_step, run_checkpoint])
            return cur.lastrowid

    def response(self, response_id: int) -> dict[str, Any]:
        rows = self._query("SELECT * FROM responses WHERE id = ?", [response_id])
        if not rows:
            raise StoreError(f"no response with id {response_id}")
        row = rows[0]
        row["sampling"] = json.loads(row["sampling"]) if row["sampling"] else None
        return row

    def response_count(self, prompt_id: int) -> int:
        """Answers stored for a prompt (the engine derives fresh sampling seeds from it)."""
        return self._query("SELECT COUNT(*) AS n FROM responses WHERE prompt_id = ?", [prompt_id])[0]["n"]

    # -- comparisons -------------------------------------------------------------------------

    def add_comparison(self, prompt_id: int, response_a_id: int, response_b_id: int, choice: str, *,
                       annotator: str | None = None, note: str | None = None, decision_ms: int | None = None,
                       margin: float | None = None, source: str = "label", repeat_of: int | None = None) -> int:
        """Record one decision; `response_a_id` is the answer shown on the left (side A). `repeat_of`: the
        decision this one repeats (the same pair shown again, sides swapped). When a reward run scored both
        answers as they were served, its margin on the decision is stored with it (`reward_margin`)."""
        if choice not in CHOICES:
            raise StoreError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self.transaction():
            cur = self.db.execute(
                """INSERT INTO comparisons (prompt_id, response_a_id, response_b_id, choice, margin, annotator,
                   note, decision_ms, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [prompt_id, response_a_id, response_b_id, choice, margin, annotator, note, decision_ms, source,
                 now_iso()])
            self._record_reward_verdict(cur.lastrowid, response_a_id, response_b_id, choice, repeat_of)
            return cur.lastrowid

    def _record_reward_verdict(self, comparison_id: int, response_a_id: int, response_b_id: int, choice: str,
                               repeat_of: int | None) -> None:
        """Store the repeat link and the margin of the latest reward run that scored both answers."""
        scored = self._query("""
            SELECT sa.reward_run, sa.score AS score_a, sb.score AS score_b FROM response_scores sa
            JOIN response_scores sb ON sb.reward_run = sa.reward_run AND sb.response_id = ?
            WHERE sa.response_id = ? ORDER BY sa.rowid DESC LIMIT 1""", [response_b_id, response_a_id])
        verdict = scored[0] if scored else None
        margin = reward_margin(verdict["score_a"], verdict["score_b"], choice) if verdict else None
        self.db.execute("UPDATE comparisons SET repeat_of = ?, reward_run = ?, reward_margin = ? WHERE id = ?",
                        [repeat_of, verdict["reward_run"] if verdict else None, margin, comparison_id])

    def delete_comparison(self, comparison_id: int) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM comparisons WHERE id = ?", [comparison_id])

    def set_comparison_note(self, comparison_id: int, note: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE comparisons SET note = ? WHERE id = ?", [note, comparison_id])

    def comparisons(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM comparisons ORDER BY id")

    def labeled_decisions(self) -> list[dict[str, Any]]:
        """Decisions made by labeling (blind sides), oldest first; imported pairs are left out: their side A is
        always the chosen answer, so they say nothing about annotators."""
        return self._query("""
            SELECT id, annotator, prompt_id, response_a_id, response_b_id, choice, decision_ms, repeat_of
            FROM comparisons WHERE source = 'label' ORDER BY id""")

    # -- label quality: the reward model's verdicts, repeated pairs ----------------------------------

    def add_response_scores(self, reward_run: str, scores: dict[int, float]) -> None:
        """A reward run's scores of answers ({response id: standardised score}), as they were served."""
        with self.transaction():
            self.db.conn.executemany(
                "INSERT INTO response_scores (response_id, reward_run, score) VALUES (?, ?, ?) "
                "ON CONFLICT (response_id, reward_run) DO UPDATE SET score = excluded.score",
                [(response_id, reward_run, float(score)) for response_id, score in scores.items()])

    def reward_margins(self, limit: int, reward_run: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` labeled decisions the reward model judged (id, choice, reward_run, reward_margin;
        newest first), of one reward run when named."""
        run_filter = "AND reward_run = ?" if reward_run else ""
        return self._query(f"""
            SELECT id, choice, reward_run, reward_margin FROM comparisons
            WHERE source = 'label' AND reward_margin IS NOT NULL {run_filter} ORDER BY id DESC LIMIT ?""",
                           [*([reward_run] if reward_run else []), limit])

    def repeat_candidate(self, seed: int) -> dict[str, Any] | None:
        """A labeled decision to show again for self-consistency: a judged one (not a skip) that is neither a
        repeat nor repeated yet, drawn by `seed`; with its prompt and both answers' texts and lengths."""
        rows = self._query("""
            SELECT c.id, c.prompt_id, c.response_a_id, c.response_b_id FROM comparisons c
            WHERE c.source = 'label' AND c.choice != 'skip' AND c.repeat_of IS NULL
              AND NOT EXISTS (SELECT 1 FROM comparisons r WHERE r.repeat_of = c.id) ORDER BY c.id""")
        if not rows:
            return None
        row = random.Random(seed).choice(rows)
        for side in ("a", "b"):
            response = self.response(row[f"response_{side}_id"])
            row[f"text_{side}"], row[f"tokens_{side}"] = response["text"], response["response_tokens"]
        return row

    def preference_pairs(self, include_ties: bool = False, include_eval: bool = False) -> list[dict[str, Any]]:
        """Decided comparisons as chosen/rejected pairs (ties only if asked; both_bad and skip never). Decisions
        on blind evaluation pairs only if asked: they judge a trained policy, and training on them would leak it.

        For ties, `chosen` is side A and `rejected` side B; `choice` says it was a tie. A repeated pair's second
        decision is left out (it measures the annotator's self-consistency; the first one counts).
        """
        choices = ["a", "b"] + (["tie"] if include_ties else [])
        rows = self._query(f"""
            SELECT c.id, c.prompt_id, c.choice, c.margin, c.annotator, c.source,
                   p.text AS prompt, p.messages AS prompt_messages,
                   ra.text AS text_a, rb.text AS text_b, c.response_a_id, c.response_b_id
            FROM comparisons c
            JOIN prompts p ON p.id = c.prompt_id
            JOIN responses ra ON ra.id = c.response_a_id
            JOIN responses rb ON rb.id = c.response_b_id
            WHERE c.choice IN ({", ".join("?" for _ in choices)}) AND (c.eval_pair_id IS NULL OR ?)
              AND c.repeat_of IS NULL
            ORDER BY c.id""", [*choices, include_eval])
        pairs = []
        for r in rows:
            b_wins = r["choice"] == "b"
            pairs.append({
                "comparison_id": r["id"], "prompt_id": r["prompt_id"], "prompt": r["prompt"],
                "prompt_messages": json.loads(r["prompt_messages"]) if r["prompt_messages"] else None,
                "chosen": r["text_b"] if b_wins else r["text_a"],
                "rejected": r["text_a"] if b_wins else r["text_b"],
                "chosen_id": r["response_b_id"] if b_wins else r["response_a_id"],
                "rejected_id": r["response_a_id"] if b_wins else r["response_b_id"],
                "choice": r["choice"], "margin": r["margin"], "annotator": r["annotator"], "source": r["source"],
            })
        return pairs

    # -- blind evaluation ----------------------------------------------------------------------

    def add_eval_session(self, session: dict[str, Any], pairs: list[dict[str, Any]]) -> str:
        """Store an evaluation session (an `eval_sessions` row without created_at) and its blind pairs (prompt_id,
        response_a_id, response_b_id, candidate_side), together; returns the session id."""
        with self.transaction():
            self.db["eval_sessions"].insert({**session, "sampling": json.dumps(session.get("sampling")),
                                             "created_at": now_iso()})
            self.db["eval_pairs"].insert_all([{**pair, "session_id": session["id"]} for pair in pairs])
        return session["id"]

    def eval_sessions(self) -> list[dict[str, Any]]:
        """Every evaluation session, oldest first, with its pair count and decisions made (skips included)."""
        rows = self._query("""
            SELECT s.*, (SELECT COUNT(*) FROM eval_pairs e WHERE e.session_id = s.id) AS pairs,
                   (SELECT COUNT(*) FROM comparisons c JOIN eval_pairs e ON e.id = c.eval_pair_id
                    WHERE e.session_id = s.id) AS decided
            FROM eval_sessions s ORDER BY s.created_at, s.id""")
        for row in rows:
            row["sampling"] = json.loads(row["sampling"]) if row["sampling"] else None
        return rows

    def eval_pairs(self, session_id: str) -> list[dict[str, Any]]:
        """A session's pairs in order, each with its prompt, both answers' texts and lengths, and its latest
        decision (choice and comparison id, None while undecided)."""
        if not self._query("SELECT 1 FROM eval_sessions WHERE id = ?", [session_id]):
            raise StoreError(f"no evaluation session {session_id!r} (see `rlhf-tui eval report`)")
        return self._query("""
            SELECT e.id, e.prompt_id, e.response_a_id, e.response_b_id, e.candidate_side,
                   p.text AS prompt, p.messages AS prompt_messages,
                   ra.text AS text_a, ra.response_tokens AS tokens_a, rb.text AS text_b, rb.response_tokens AS tokens_b,
                   c.choice, c.id AS comparison_id
            FROM eval_pairs e
            JOIN prompts p ON p.id = e.prompt_id
            JOIN responses ra ON ra.id = e.response_a_id
            JOIN responses rb ON rb.id = e.response_b_id
            LEFT JOIN comparisons c ON c.id = (SELECT MAX(id) FROM comparisons WHERE eval_pair_id = e.id)
            WHERE e.session_id = ? ORDER BY e.id""", [session_id])

    def add_eval_decision(self, eval_pair_id: int, choice: str, *, annotator: str | None = None,
                          note: str | None = None, decision_ms: int | None = None) -> int:
        """Record a decision on a blind evaluation pair: a comparison (source "eval") pointing at the pair."""
        rows = self._query("SELECT prompt_id, response_a_id, response_b_id FROM eval_pairs WHERE id = ?",
                           [eval_pair_id])
        if not rows:
            raise StoreError(f"no evaluation pair with id {eval_pair_id}")
        pair = rows[0]
        with self.transaction():
            comparison_id = self.add_comparison(pair["prompt_id"], pair["response_a_id"], pair["response_b_id"],
                                                choice, annotator=annotator, note=note, decision_ms=decision_ms,
                                                source="eval")
            self.db.execute("UPDATE comparisons SET eval_pair_id = ? WHERE id = ?", [eval_pair_id, comparison_id])
        return comparison_id

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
        return [Run.from_row(r) for r in self._query(sql + " ORDER BY started_at, id", params)]

    def latest_run(self, kind: str, status: RunStatus = RunStatus.FINISHED) -> Run | None:
        rows = self._query("SELECT * FROM runs WHERE kind = ? AND status = ? ORDER BY started_at DESC, id DESC "
                           "LIMIT 1", [kind, status])
        return Run.from_row(rows[0]) if rows else None

    def finished_reward_runs(self) -> list[Run]:
        """The reward runs PPO may use, newest first: the first is the default of `finished_reward_run`."""
        return [Run.from_row(r) for r in self._query(
            "SELECT * FROM runs WHERE kind = 'reward' AND status = ? ORDER BY started_at DESC, id DESC",
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


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None when there is none: tells a deleted or replaced file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _decode_prompt(row: dict[str, Any]) -> dict[str, Any]:
    row["messages"] = json.loads(row["messages"]) if row["messages"] else None
    row["tags"] = json.loads(row["tags"]) if row["tags"] else []
    return row


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
