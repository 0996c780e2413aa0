"""One connection to the workspace database: opening (WAL, busy timeout, foreign keys), migrating, one-line
errors, transactions, and writing the database back when its file was deleted under it. The query families
(`labels`, `evals`, `runs`) build on `Connection`; `rlhf.store.Store` joins them."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import StoreError
from . import schema


DEFAULT_BUSY_TIMEOUT_S = 10.0
# A labeling session renews its prompt claims whenever it asks for a pair, and the claims of a process that
# has ended lapse at once (no release needed): the expiry only guards against a pid reused by another process.
PROMPT_CLAIM_TTL_S = 3600.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")




def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None when there is none: tells a deleted or replaced file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Connection:
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
        if version > schema.SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: database schema v{version} is newer than this rlhf-tui (v{schema.SCHEMA_VERSION}); "
                "upgrade rlhf-tui")
        for target in range(version, schema.SCHEMA_VERSION):
            # The write lock is taken first: two processes opening a fresh DB at once must not both migrate it.
            with self.transaction():
                if self.schema_version == target:
                    schema.MIGRATIONS[target](self.db)
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
