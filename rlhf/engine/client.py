"""The app's handle on the engine process: start it, send requests, drain events, stop it.

No torch here: the worker module (which imports torch) is imported only inside the spawned child.
`start()` must be called from the thread that lives as long as the app (its main thread): Linux's
parent-death signal fires when the *thread* that spawned the child exits.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from ..config import Config, Workspace
from . import protocol

# How long stop() waits for a Shutdown to be honoured before terminating the engine: an idle engine
# (or one still loading) has nothing to save; a training run finishes its step and checkpoints.
IDLE_STOP_TIMEOUT_S = 2.0
RUN_STOP_TIMEOUT_S = 60.0

# The app pings the engine this often; no answer for UNRESPONSIVE_AFTER_S means it is stopped or frozen
# (a busy engine still answers: its request reader is a thread of its own).
PING_INTERVAL_S = 1.0
UNRESPONSIVE_AFTER_S = 10.0

ENGINE_LOG = "engine.log"
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
PARENT_CHECK_INTERVAL_S = 0.5
ENGINE_NICENESS = 5


def _engine_main(conn: Connection, workspace_root: str, config: Config, parent_pid: int) -> None:
    """Entry point of the spawned process: tie its life to the app's, then import torch and serve with the
    app's `config` (pickled across: the engine never reads rlhf.toml itself)."""
    _die_with_parent(parent_pid)
    # The terminal belongs to the UI: warnings and tracebacks go to the workspace's engine.log.
    _redirect_output(os.path.join(workspace_root, ENGINE_LOG))
    # Ctrl+C and a closed terminal (SIGHUP) signal the whole process group; the app alone decides when we
    # stop (it stops a run with a checkpoint first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # On a machine with few cores, sampling would otherwise take the CPU time the UI needs to
    # answer a key at once; a lower priority costs the engine nothing when the UI is idle.
    os.nice(ENGINE_NICENESS)
    conn.send(protocol.Status(protocol.STARTING, "starting the engine (importing torch)…", 0.0))
    from .worker import serve

    serve(conn, workspace_root, config)


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the app does, even if it is SIGKILLed: the kernel's parent-death signal on Linux,
    and a thread that watches our parent pid everywhere (and covers the race before prctl)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher thread below still works

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_INTERVAL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _redirect_output(log_path: str) -> None:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    print(f"--- engine pid {os.getpid()} started {time.strftime('%Y-%m-%d %H:%M:%S')}", file=sys.stderr, flush=True)


def describe_exit(exitcode: int | None) -> str:
    """A one-line reason for an engine exit code (negative = killed by that signal)."""
    if exitcode is None:
        return "the engine is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"the engine process was killed by {name}{hint}"
    return f"the engine process exited with code {exitcode}"


def _ensure_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (spawn needs it) with the real stderr.

    Its launch passes sys.stderr's fd to the tracker; inside a Textual app sys.stderr is a capture
    object whose fileno() is -1, and the launch fails with "bad value(s) in fds_to_keep".
    """
    captured, sys.stderr = sys.stderr, sys.__stderr__
    try:
        resource_tracker.ensure_running()
    finally:
        sys.stderr = captured


class EngineClient:
    """One engine worker process and the pipe to it, loading the model and sampling as `config` says (the
    app's resolved config: rlhf.toml, flags and demo defaults). Not thread-safe: use it from the app's thread."""

    def __init__(self, workspace: Workspace, config: Config) -> None:
        self.workspace = workspace
        self.config = config
        self._ctx = mp.get_context("spawn")  # fork would copy the UI's threads and terminal state
        self._process: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._death_reported = False
        self.running_runs: set[str] = set()  # ids seen in RunStarted and not yet in RunEnded
        self.unresponsive_after_s = UNRESPONSIVE_AFTER_S
        self._ping_sent_at: float | None = None  # the ping not answered yet
        self._last_ping_at = 0.0
        self._ever_answered = False  # silence counts only once it has answered (it imports torch first)
        self.unresponsive = False

    def start(self) -> None:
        if self.alive:
            raise RuntimeError("the engine is already running")
        _ensure_resource_tracker()
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        # daemon: multiprocessing's exit handler terminates it if the app exits without stop().
        process = self._ctx.Process(
            target=_engine_main, name="rlhf-engine", daemon=True,
            args=(child_conn, str(self.workspace.root), self.config, os.getpid()))
        process.start()
        child_conn.close()  # the child's end lives in the child only; EOF then means the child is gone
        self._process, self._conn = process, parent_conn
        self._death_reported = False
        self.running_runs.clear()
        self._ping_sent_at, self._ever_answered, self.unresponsive = None, False, False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode if self._process else None

    def send(self, request: protocol.Request) -> bool:
        """Send a request; False if the engine is gone (poll() then reports why)."""
        if self._conn is None:
            return False
        try:
            self._conn.send(request)
        except (BrokenPipeError, ConnectionResetError, OSError):
            return False
        return True

    def poll(self) -> list[protocol.Event]:
        """Every event available now, without waiting.

        When the process has died, the events it sent first are followed by one fatal Error (once);
        after a hard stop the engine is restarted instead, announced by a Status.
        """
        events: list[protocol.Event] = []
        if self._conn is None:
            return events
        try:
            while self._conn.poll(0):
                events.append(self._conn.recv())
        except (EOFError, OSError):
            pass  # the child closed its end: the liveness check below says how it ended
        if any(isinstance(event, protocol.Pong) for event in events):
            self._ping_sent_at, self._ever_answered = None, True
            events = [event for event in events if not isinstance(event, protocol.Pong)]
        events += self._check_responding(time.monotonic())
        for event in events:
            if isinstance(event, protocol.RunStarted):
                self.running_runs.add(event.run_id)
            elif isinstance(event, protocol.RunEnded):
                self.running_runs.discard(event.run_id)
            elif isinstance(event, protocol.Error) and event.fatal:
                self._death_reported = True  # the engine said why it is ending: that is the message to keep
        if self._process is not None and not self._process.is_alive() and not self._death_reported:
            self._process.join(0)
            if self._process.exitcode == protocol.HARD_STOP_EXIT_CODE:
                self.restart()
                events.append(protocol.Status(protocol.STARTING, "restarting the engine after a hard stop…", 0.0))
            else:
                self._death_reported = True
                events.append(protocol.Error(describe_exit(self._process.exitcode), fatal=True))
        return events

    def _check_responding(self, now: float) -> list[protocol.Event]:
        """Ping when due; a Responding event when the engine stops answering, or answers again."""
        if self._ping_sent_at is None and now - self._last_ping_at >= PING_INTERVAL_S and self.alive:
            if self.send(protocol.Ping()):
                self._ping_sent_at = self._last_ping_at = now
        silent_s = now - self._ping_sent_at if self._ping_sent_at is not None else 0.0
        unresponsive = self._ever_answered and silent_s > self.unresponsive_after_s and self.alive
        if unresponsive == self.unresponsive:
            return []
        self.unresponsive = unresponsive
        if not unresponsive:
            return [protocol.Responding(True)]
        return [protocol.Responding(False, f"the engine is not responding (no answer for {silent_s:.0f} s: "
                                           "stopped, frozen or out of memory?)")]

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask the engine to shut down; terminate, then kill, if it does not within the timeout
        (default: short when idle or not responding, long enough for a run to checkpoint when one is in
        progress)."""
        process, conn = self._process, self._conn
        if process is None:
            return
        self._death_reported = True  # an exit we asked for is not news
        if timeout_s is None:
            timeout_s = RUN_STOP_TIMEOUT_S if self.running_runs and not self.unresponsive else IDLE_STOP_TIMEOUT_S
        if process.is_alive():
            self.send(protocol.Shutdown())
            process.join(timeout_s)
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
        if conn is not None:
            conn.close()
        self._conn = None

    def restart(self) -> None:
        self.stop()
        self.start()
