"""Process locks on workspace files: one PPO run per workspace, one process training a given run.

A lock is a file holding its owner's pid. It appears with the pid already in it (a hard link of a finished
temp file), so a second process never reads an empty lock and mistakes it for a stale one; a lock whose
process is gone is stale and taken over.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import RlhfError, describe_write_error
from .store import _pid_alive

RUN_LOCK_FILE = "run.lock"


def _lock_owner(path: Path) -> int:
    try:
        return int(path.read_text(encoding="utf-8").strip() or 0)
    except (OSError, ValueError):
        return 0


@contextmanager
def pid_lock(path: Path, busy: Callable[[int], str]) -> Iterator[None]:
    """Hold `path` for this process; `busy(pid)` is the message of the RlhfError raised while another live
    process holds it. Creates the lock's folder if needed and removes it again when it was made for nothing."""
    made_dir = not path.parent.exists()
    claim = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        claim.write_text(str(os.getpid()), encoding="utf-8")
    except OSError as exc:  # a read-only runs/, a full disk: before anything of the run is written
        if made_dir:
            with suppress(OSError):
                path.parent.rmdir()
        raise RlhfError(f"{path.parent}: cannot write here ({describe_write_error(exc)}): make it writable (or "
                        "free some space); nothing was written") from None
    try:
        while True:
            try:
                os.link(claim, path)
                break
            except FileExistsError:
                pid = _lock_owner(path)
                if pid and _pid_alive(pid):
                    raise RlhfError(busy(pid)) from None
                path.unlink(missing_ok=True)  # stale: its process ended without cleaning up
    finally:
        claim.unlink(missing_ok=True)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if made_dir:
            with suppress(OSError):  # rmdir only succeeds when empty: a run that never began leaves no folder
                path.parent.rmdir()


@contextmanager
def run_lock(run_dir: Path, run_id: str) -> Iterator[None]:
    """One process at a time trains `run_id` (two resumes of one run would both write its checkpoints)."""
    with pid_lock(run_dir / RUN_LOCK_FILE,
                  lambda pid: f"run {run_id!r} is already being trained by another process (pid {pid}): "
                              "wait for it, or stop it first"):
        yield
