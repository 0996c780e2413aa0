"""Helpers of the reliability suite: tiny workspaces, the real `rlhf-tui` command, file-tree snapshots,
stderr followers and the /proc view of a process's network sockets."""

from __future__ import annotations

import hashlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rlhf.config import Workspace
from rlhf.hooks import RunHooks

# Small enough for a few seconds per run on a shared 2-core box: one PPO step is 2 prompts x 8 tokens.
TINY_SETTINGS = """
[sampling]
max_new_tokens = 8
[reward]
epochs = 1
batch_size = 4
heldout_fraction = 0.25
[ppo]
steps = 3
batch_size = 2
minibatches = 1
ppo_epochs = 1
max_new_tokens = 8
checkpoint_every = 2
"""
SUBPROCESS_TIMEOUT_S = 300  # a cold process imports torch first; the box is shared


def make_labeled_workspace(root: Path, model_dir: Path) -> Workspace:
    """A workspace on the tiny model with TINY_SETTINGS and 24 imported hidden-rule pairs on 8 prompts."""
    from tools.tiny import hidden_rule_pairs, workspace_with_pairs  # imports torch: only when a test needs one

    return workspace_with_pairs(root, model_dir, hidden_rule_pairs(num_prompts=8, pairs_per_prompt=3),
                                TINY_SETTINGS)


class StopAfter(RunHooks):
    """Ends a run gracefully (with a checkpoint) once `steps` steps have been reported."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def on_step(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        if step >= self.steps:
            self.stop_requested.set()


def rlhf_tui(*args: str | Path, timeout: float = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "-m", "rlhf_tui.app.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def start_rlhf_tui(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlhf_tui.app.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


class LineFollower:
    """Reads a pipe on a thread so a test can wait for a line without blocking forever."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float = SUBPROCESS_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching line within {timeout_s}s:\n{''.join(self.lines)}") from None
            if line is None:
                raise AssertionError(f"the process ended first:\n{''.join(self.lines)}")
            self.lines.append(line)
            if predicate(line):
                return line


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file (with a hash of its bytes) and folder under `root`: equal snapshots mean nothing was written."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def assert_one_line_error(returncode: int, stderr: str, *fragments: str) -> None:
    """What every user error looks like: non-zero exit, one `rlhf-tui: error:` line, no traceback."""
    assert returncode != 0, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.startswith("rlhf-tui: error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


# /proc/net/tcp* state column: 0A is LISTEN.
TCP_LISTEN = "0A"


def network_sockets(pid: int) -> list[str]:
    """The TCP sockets listening and the UDP sockets bound by `pid`, as "proto local-address" lines (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        table = Path(f"/proc/net/{proto}")
        if not table.exists():
            continue
        for row in table.read_text().splitlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (proto.startswith("udp") or state == TCP_LISTEN):
                found.append(f"{proto} {local}")
    return found
