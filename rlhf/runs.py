"""One run's life, the same for reward training, PPO and any later algorithm: its row, metrics and samples,
checkpoint bookkeeping, stop checks, failure messages and its end. A training loop keeps only its optimisation
and asks its `RunSession` for everything else."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from .checkpoints import (CheckpointWriteError, checkpoint_path, checkpoints_kept, prune_checkpoints, resume_command,
                          write_checkpoint, write_folder_atomically)
from .config import Workspace
from .errors import RlhfError, cancel_if_stopped
from .hooks import RunHooks, RunResult
from .run_rows import Run, RunStatus
from .store import Store, new_run_id

# What a stop that came in while a fresh run was still loading names, per kind of run.
LOADING_NAMES = {"reward": "reward training", "ppo": "ppo"}


@contextmanager
def open_store(workspace: Workspace, store: Store | None = None) -> Iterator[Store]:
    """`store` when the caller passed one (it stays open), else the workspace's own, closed afterwards."""
    if store is not None:
        yield store
        return
    with Store(workspace.db_path) as own:
        yield own


def error_line(exc: BaseException) -> str:
    """The one line a run's row keeps about an unexpected exception: our own errors' first line as it is, any other
    exception's type name before it."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, RlhfError) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class RunSession:
    """The bookkeeping of one run in this process, from its first step to its end.

    Made by `start` (a new run: folder and row, both or neither) or `resume` (a stopped, failed or interrupted
    run from its checkpoint's step); both first refuse to begin when a stop came in while the model loaded.
    `step` counts the steps done, `saved_step` the step of the last checkpoint written; the run keeps its newest
    `keep_checkpoints` checkpoints (`checkpoints.checkpoints_kept`: PPO's setting, one for other runs).

    Used as a context manager around the training: an exception that escapes it marks the run "interrupted"
    (Ctrl+C) or "failed" with a one-line error, and goes on. Expected ends go through `finish` or
    `finish_with_product`.

    `writes` says whether this process writes the run: its row, metrics, samples, run folder and checkpoints,
    and whether it reports them through the hooks. True for a run in one process. In a data-parallel run every
    rank runs the same loop with its own session and only rank 0 writes: ranks > 0 pass writes=False (and rank
    0's run id); they still count steps and poll `should_stop`, and write and report nothing.
    """

    def __init__(self, store: Store, hooks: RunHooks, kind: str, run_id: str, run_dir: Path, total_steps: int,
                 start_step: int = 0, *, keep_checkpoints: int = 1, writes: bool = True) -> None:
        self.store, self.hooks, self.kind, self.run_id = store, hooks, kind, run_id
        self.run_dir, self.total_steps, self.writes = run_dir, total_steps, writes
        self.keep_checkpoints = keep_checkpoints
        self.step = self.saved_step = start_step
        self._report = hooks if writes else RunHooks()  # a rank that does not write reports nothing either
        self._database_lost = False  # the database file went and could not be written back (said once)

    @classmethod
    def start(cls, store: Store, workspace: Workspace, hooks: RunHooks, kind: str, config: dict[str, Any], *,
              total_steps: int, parent_run: str | None = None, files: Callable[[Path], None] | None = None,
              run_id: str | None = None, writes: bool = True) -> RunSession:
        """A new run: its folder filled by `files(folder)` when given, then its row. Both or neither: a read-only
        runs/ or a full disk leaves nothing behind."""
        cancel_if_stopped(hooks.should_stop(), LOADING_NAMES[kind])
        run_id = run_id or new_run_id(kind)
        run_dir = workspace.run_dir(run_id)
        if writes:
            _create_run(store, workspace, run_id, kind, config, total_steps, parent_run, files)
        session = cls(store, hooks, kind, run_id, run_dir, total_steps,
                      keep_checkpoints=checkpoints_kept(kind, config), writes=writes)
        session._report.on_start(run_id, kind, total_steps, 0)
        return session

    @classmethod
    def resume(cls, store: Store, workspace: Workspace, hooks: RunHooks, run: Run, start_step: int, *,
               writes: bool = True) -> RunSession:
        """Continue `run` (a row `checkpoints.resumable_run` accepted) from `start_step`, its checkpoint's step:
        what it logged past that step is dropped."""
        cancel_if_stopped(hooks.should_stop(), f"{run.kind} run {run.id}")
        if writes:
            store.resume_run(run.id, start_step)
        session = cls(store, hooks, run.kind, run.id, workspace.run_dir(run.id), run.total_steps, start_step,
                      keep_checkpoints=checkpoints_kept(run.kind, run.config), writes=writes)
        session._report.on_start(run.id, run.kind, run.total_steps, start_step)
        return session

    def __enter__(self) -> RunSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc is not None and self.writes:
            status = RunStatus.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
            self.store.update_run(self.run_id, status=status, error=error_line(exc))

    # -- while it runs ---------------------------------------------------------------------------

    def should_stop(self) -> bool:
        """Whether a stop was asked for: polled between steps; the loop then ends with `stop`."""
        return self.hooks.should_stop()

    def warn(self, message: str) -> None:
        self._report.on_warning(self.run_id, message)

    def log(self, metrics: dict[str, float]) -> None:
        """Metrics of the current step (say, an evaluation after it)."""
        if self.writes:
            self.store.log_metrics(self.run_id, self.step, metrics)
        self._report.on_step(self.run_id, self.step, metrics)

    def step_done(self, metrics: dict[str, float], samples: list[dict[str, Any]] | None = None) -> None:
        """One more step done: its metrics and samples are logged and the row's step moves on."""
        self.step += 1
        if self.writes:
            self.store.log_metrics(self.run_id, self.step, metrics)
            if samples is not None:
                self.store.add_samples(self.run_id, self.step, samples)
            self.store.update_run(self.run_id, step=self.step)
        self._report.on_step(self.run_id, self.step, metrics)
        if samples is not None:
            self._report.on_samples(self.run_id, self.step, samples)

    def checkpoint(self, write: Callable[[Path, int], None]) -> Path:
        """The checkpoint of the current step: `write(folder, step)` fills it, atomically (CheckpointWriteError
        when it cannot, the older ones kept); the row names it, then the ones past `keep_checkpoints` (and stale
        newer ones) are removed."""
        path = checkpoint_path(self.run_dir, self.step)
        if self.writes:
            self._keep_database_on_disk()
            write_checkpoint(self.run_dir, self.step, lambda folder: write(folder, self.step))
            self.store.update_run(self.run_id, checkpoint=str(path), checkpoint_step=self.step)
            prune_checkpoints(self.run_dir, self.step, self.keep_checkpoints)
        self._report.on_checkpoint(self.run_id, self.step, str(path))
        self.saved_step = self.step
        return path

    def save_progress(self, write: Callable[[Path, int], None]) -> None:
        """Checkpoint the steps done since the last checkpoint, if there are any (a run that ends early)."""
        if self.step > self.saved_step:
            self.checkpoint(write)

    def stop(self, write: Callable[[Path, int], None]) -> None:
        """A stop was asked for: the row says "stopping" while the steps since the last checkpoint are saved."""
        if self.writes:
            self.store.update_run(self.run_id, status=RunStatus.STOPPING)
        self.save_progress(write)

    def last_checkpoint(self) -> str | None:
        return str(checkpoint_path(self.run_dir, self.saved_step)) if self.saved_step else None

    # -- messages --------------------------------------------------------------------------------

    def kept(self) -> str:
        """What is left to resume from, for a failure message."""
        return f"last checkpoint: step {self.saved_step}" if self.saved_step else "no checkpoint yet"

    def checkpoint_failed(self, exc: CheckpointWriteError) -> str:
        """The message of a run that could not write a checkpoint (a full disk): what failed, what is kept, how to
        go on once there is room."""
        return (f"{exc}; the run stopped ({self.kept()}). Resume it with `{resume_command(self.kind, self.run_id)}` "
                "once there is room")

    def step_failed(self, what: str, advice: str) -> str:
        """The message of a run whose next step failed (`what`: out of memory, a non-finite loss)."""
        return f"step {self.step + 1}: {what}; the run stopped ({self.kept()}). {advice}"

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, status: RunStatus, message: str) -> RunResult:
        """End a run whose last checkpoint is what it made (PPO's policy adapter); `message` is the row's error
        when it failed."""
        self._end(status, message)
        return RunResult(self.run_id, status, message, self.last_checkpoint(), self.step)

    def finish_with_product(self, product: Path | None, status: RunStatus, message: str) -> RunResult:
        """End a run that made `product`, a folder beside its checkpoints (a reward model), or None when it could
        not make it: the row and the result name it, and a finished run's checkpoints are removed, as nothing is
        left to resume."""
        fields = {"step": self.step, "checkpoint": str(product), "checkpoint_step": self.step} if product else {}
        self._end(status, message, **fields)
        if product is not None:
            if self.writes and status == RunStatus.FINISHED:
                prune_checkpoints(self.run_dir)  # after the row names the product, never a deleted checkpoint
            self._report.on_checkpoint(self.run_id, self.step, str(product))
        return RunResult(self.run_id, status, message, str(product) if product else None, self.step)

    def _end(self, status: RunStatus, message: str, **fields: Any) -> None:
        if self.writes:
            self._keep_database_on_disk()
            error = {"error": message} if status == RunStatus.FAILED else {}
            self.store.update_run(self.run_id, status=status, **error, **fields)

    def _keep_database_on_disk(self) -> None:
        """At a checkpoint and at the end: when the database file was deleted while the run trained (the store
        still writes to the deleted file, which goes when the run ends), write it back whole, labels and every
        row of the run, and go on in it. When another file took its place, the database is saved beside it and
        the run says so, once. Runs in the app's engine leave this to the app (`RunHooks.writes_back_database`)."""
        if not self.hooks.writes_back_database or self._database_lost or self.store.still_on_disk():
            return
        try:
            path = self.store.restore_to_disk()
        except RlhfError as exc:
            self._database_lost = True
            self.warn(f"{exc}; the run goes on writing to the deleted database")
            return
        self.warn(f"{path.name} was deleted during the run: wrote it back whole at step {self.step}")


def _create_run(store: Store, workspace: Workspace, run_id: str, kind: str, config: dict[str, Any],
                total_steps: int, parent_run: str | None, files: Callable[[Path], None] | None) -> None:
    """The run's folder (when it has `files`) and row, both or neither."""
    run_dir = workspace.run_dir(run_id)
    made_runs_dir = not workspace.runs_dir.exists()
    try:
        if files is not None:
            try:
                write_folder_atomically(run_dir, files)
            except CheckpointWriteError as exc:
                raise RlhfError(f"{run_dir}: cannot create the run's folder: {exc} (check that {workspace.runs_dir} "
                                "is writable and has room); nothing was written") from None
        store.create_run(kind, config, total_steps=total_steps, parent_run=parent_run, run_id=run_id)
    except BaseException:
        if files is not None:
            shutil.rmtree(workspace.runs_dir if made_runs_dir else run_dir, ignore_errors=True)
        raise

