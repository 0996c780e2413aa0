"""RunSession, the run bookkeeping reward training and PPO share, on a real store with a stand-in optimisation
(a checkpoint is one small file): rows, metrics, samples, checkpoints, ends, and a rank that does not write."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf import runs
from rlhf.checkpoints import CHECKPOINTS_DIR, CheckpointWriteError, checkpoint_path
from rlhf.config import Workspace
from rlhf.errors import RlhfError
from rlhf.hooks import RunHooks
from rlhf.runs import RunSession, error_line
from rlhf.store import Store


class Recorder(RunHooks):
    """Every report a session makes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def on_start(self, run_id, kind, total_steps, start_step=0):
        self.calls.append(("start", total_steps, start_step))

    def on_step(self, run_id, step, metrics):
        self.calls.append(("step", step))

    def on_samples(self, run_id, step, samples):
        self.calls.append(("samples", step))

    def on_checkpoint(self, run_id, step, path):
        self.calls.append(("checkpoint", step, Path(path).name))

    def on_warning(self, run_id, message):
        self.calls.append(("warning", message))


def write_step(folder: Path, step: int) -> None:
    (folder / "state.txt").write_text(str(step))


def _run_three_steps(session: RunSession) -> None:
    for step in range(3):
        session.step_done({"loss": 1.0 / (step + 1)}, [{"prompt_id": None, "prompt": "p", "response": "r"}])
        if session.step % 2 == 0:
            session.checkpoint(write_step)
    session.warn("w")


def checkpoint_folders(ws: Workspace, run_id: str) -> list[str]:
    return sorted(p.name for p in (ws.run_dir(run_id) / CHECKPOINTS_DIR).iterdir())


def test_a_session_writes_rows_metrics_samples_and_checkpoints(tmp_path):
    ws, hooks = Workspace(tmp_path), Recorder()
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, hooks, "ppo", {"ppo": {"keep_checkpoints": 1}}, total_steps=3)
        with session:
            _run_three_steps(session)
            session.stop(write_step)  # steps 3 > 2: saved on the way out
        result = session.finish("stopped", "stopped at step 3/3")
        run = store.run(session.run_id)
        assert [row["value"] for row in store.metrics(session.run_id, "loss")] == pytest.approx([1, 1 / 2, 1 / 3])
        assert len(store.samples(session.run_id)) == 3
    assert (run.status, run.step, run.checkpoint_step, run.error) == ("stopped", 3, 3, None)
    assert checkpoint_folders(ws, session.run_id) == ["step-3"]
    assert (result.status, result.step, Path(result.checkpoint).name) == ("stopped", 3, "step-3")
    assert hooks.calls == [("start", 3, 0), ("step", 1), ("samples", 1), ("step", 2), ("samples", 2),
                           ("checkpoint", 2, "step-2"), ("step", 3), ("samples", 3), ("warning", "w"),
                           ("checkpoint", 3, "step-3")]


@pytest.mark.parametrize(("kind", "config", "kept"), [
    ("ppo", {"ppo": {"keep_checkpoints": 2}}, ["step-4", "step-5"]),
    ("ppo", {"ppo": {}}, ["step-3", "step-4", "step-5"]),  # a run stored before the setting: its default, 3
    ("reward", {"ppo": {"keep_checkpoints": 2}}, ["step-5"]),  # a reward run keeps only its latest
])
def test_a_run_keeps_its_newest_checkpoints_and_its_row_names_the_latest(tmp_path, kind, config, kept):
    ws = Workspace(tmp_path)
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, RunHooks(), kind, config, total_steps=5)
        with session:
            for _ in range(5):
                session.step_done({})
                session.checkpoint(write_step)
        run = store.run(session.run_id)
    assert checkpoint_folders(ws, session.run_id) == kept
    assert (run.checkpoint_step, run.checkpoint) == (5, str(checkpoint_path(ws.run_dir(session.run_id), 5)))


def test_a_resumed_run_removes_checkpoints_newer_than_its_own(tmp_path):
    """Killed after writing step 6's checkpoint but before the row named it, a run resumes from step 3: the step-6
    folder is not its history, and goes (with a write's temp folder) once the resumed run writes a checkpoint."""
    ws = Workspace(tmp_path)
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, RunHooks(), "ppo", {"ppo": {"keep_checkpoints": 2}}, total_steps=9)
        with session:
            for _ in range(3):
                session.step_done({})
                session.checkpoint(write_step)
        run_dir = ws.run_dir(session.run_id)
        for leftover in (checkpoint_path(run_dir, 6), run_dir / CHECKPOINTS_DIR / "step-5.tmp"):
            leftover.mkdir()
        resumed = RunSession.resume(store, ws, RunHooks(), store.run(session.run_id), 3)
        assert checkpoint_folders(ws, session.run_id) == ["step-2", "step-3", "step-5.tmp", "step-6"]
        with resumed:
            resumed.step_done({})
            resumed.checkpoint(write_step)
        assert store.run(session.run_id).checkpoint_step == 4
    assert checkpoint_folders(ws, session.run_id) == ["step-3", "step-4"]
    assert (checkpoint_path(run_dir, 4) / "state.txt").read_text() == "4"


def test_a_kill_before_the_older_checkpoints_go_leaves_the_row_naming_a_whole_one(tmp_path, monkeypatch):
    """The row names the new checkpoint before older ones are removed: a kill in between leaves more folders than
    kept, never a row naming a deleted one; the next checkpoint removes the extra ones."""
    def killed(*args):
        raise KeyboardInterrupt

    ws = Workspace(tmp_path)
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, RunHooks(), "ppo", {"ppo": {"keep_checkpoints": 1}}, total_steps=9)
        with session:
            session.step_done({})
            session.checkpoint(write_step)
        with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt), session:
            patched.setattr(runs, "prune_checkpoints", killed)
            session.step_done({})
            session.checkpoint(write_step)
        run = store.run(session.run_id)
        assert (run.status, run.checkpoint_step) == ("interrupted", 2) and Path(run.checkpoint).is_dir()
        assert checkpoint_folders(ws, session.run_id) == ["step-1", "step-2"]
        with session:
            session.step_done({})
            session.checkpoint(write_step)
    assert checkpoint_folders(ws, session.run_id) == ["step-3"]


def test_a_session_that_does_not_write_counts_steps_and_leaves_no_trace(tmp_path):
    """A data-parallel rank > 0: the same loop, nothing in the store or on disk, nothing reported."""
    ws, hooks = Workspace(tmp_path), Recorder()
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, hooks, "ppo", {}, total_steps=3, run_id="ppo-rank1", writes=False)
        with session:
            _run_three_steps(session)
        result = session.finish("finished", "finished 3 steps")
        assert store.runs() == [] and store.metrics("ppo-rank1") == []
    assert not ws.runs_dir.exists() and hooks.calls == []
    assert (result.run_id, result.status, result.step, session.saved_step) == ("ppo-rank1", "finished", 3, 2)


def test_a_product_run_names_its_product_and_a_finished_one_drops_its_checkpoints(tmp_path):
    ws, hooks = Workspace(tmp_path), Recorder()
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, hooks, "reward", {}, total_steps=3,
                                   files=lambda folder: (folder / "pairs.json").write_text("[]"))
        with session:
            _run_three_steps(session)
        product = ws.run_dir(session.run_id) / "reward"
        result = session.finish_with_product(product, "finished", "held-out accuracy 1.0")
        run = store.run(session.run_id)
    assert (run.status, run.checkpoint, run.checkpoint_step) == ("finished", str(product), 3)
    assert sorted(p.name for p in ws.run_dir(session.run_id).iterdir()) == ["pairs.json"]
    assert (result.checkpoint, hooks.calls[-1]) == (str(product), ("checkpoint", 3, "reward"))


@pytest.mark.parametrize(("exc", "status", "error"), [
    (KeyboardInterrupt(), "interrupted", "KeyboardInterrupt"),
    (ValueError("bad value\nmore"), "failed", "ValueError: bad value"),
    (RlhfError("one line for the user"), "failed", "one line for the user"),
])
def test_an_escaping_exception_marks_the_run_and_goes_on(tmp_path, exc, status, error):
    ws = Workspace(tmp_path)
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, RunHooks(), "ppo", {}, total_steps=3)
        with pytest.raises(type(exc)), session:
            session.step_done({"loss": 1.0})
            raise exc
        run = store.run(session.run_id)
    assert (run.status, run.error, run.step) == (status, error, 1) and error_line(exc) == error


def test_failure_messages_say_what_is_kept_and_how_to_go_on(tmp_path):
    ws = Workspace(tmp_path)
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, RunHooks(), "reward", {}, total_steps=9)
        assert session.step_failed("out of GPU memory", "Lower it.") == (
            "step 1: out of GPU memory; the run stopped (no checkpoint yet). Lower it.")
        session.step_done({})
        session.checkpoint(write_step)
        assert session.checkpoint_failed(CheckpointWriteError("disk full")) == (
            f"disk full; the run stopped (last checkpoint: step 1). Resume it with "
            f"`rlhf-tui train-reward --resume {session.run_id}` once there is room")


def test_a_stop_while_loading_starts_nothing(tmp_path):
    ws, hooks = Workspace(tmp_path), RunHooks()
    hooks.stop_requested.set()
    with Store(ws.db_path) as store:
        with pytest.raises(RlhfError, match="ppo: stopped before its first step"):
            RunSession.start(store, ws, hooks, "ppo", {}, total_steps=3)
        assert store.runs() == []


def test_a_database_deleted_during_a_run_is_written_back_at_its_next_checkpoint(tmp_path):
    """`rm rlhf.db*` while a run trains: the store still writes to the deleted file, which would go with every
    label and the run's rows when the run ends. The next checkpoint writes it back whole, and the run goes on in it."""
    from rlhf.store import PromptItem

    ws, hooks = Workspace(tmp_path), Recorder()
    with Store(ws.db_path) as store:
        store.add_prompts([PromptItem("a labeled prompt")], source="test")
        session = RunSession.start(store, ws, hooks, "ppo", {"ppo": {"keep_checkpoints": 1}}, total_steps=3)
        with session:
            session.step_done({"loss": 1.0})
            for suffix in ("", "-wal", "-shm"):
                Path(f"{ws.db_path}{suffix}").unlink(missing_ok=True)
            session.step_done({"loss": 0.5})
            session.checkpoint(write_step)
            session.step_done({"loss": 0.25})
        session.finish("finished", "finished 3 steps")
    assert ("warning", "rlhf.db was deleted during the run: wrote it back whole at step 2") in hooks.calls
    with Store(ws.db_path) as store:
        run = store.run(session.run_id)
        assert (run.status, run.step, run.checkpoint_step) == ("finished", 3, 2)
        assert [row["value"] for row in store.metrics(session.run_id, "loss")] == [1.0, 0.5, 0.25]
        assert [prompt["text"] for prompt in store.prompts()] == ["a labeled prompt"]


def test_a_database_another_file_replaced_is_saved_beside_it_and_said_once(tmp_path):
    ws, hooks = Workspace(tmp_path), Recorder()
    with Store(ws.db_path) as store:
        session = RunSession.start(store, ws, hooks, "ppo", {"ppo": {"keep_checkpoints": 1}}, total_steps=4)
        with session:
            session.step_done({"loss": 1.0})
            for suffix in ("", "-wal", "-shm"):
                Path(f"{ws.db_path}{suffix}").unlink(missing_ok=True)
            ws.db_path.write_text("not ours")
            for _ in range(2):
                session.step_done({"loss": 0.5})
                session.checkpoint(write_step)
    warnings = [call[1] for call in hooks.calls if call[0] == "warning"]
    assert len(warnings) == 1 and "another file took the database's place" in warnings[0], warnings
    assert warnings[0].endswith("; the run goes on writing to the deleted database")
    (saved,) = tmp_path.glob("rlhf.db.recovered-*")
    with Store(saved) as store:
        assert store.run(session.run_id).step == 2
    assert ws.db_path.read_text() == "not ours"
