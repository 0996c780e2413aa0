"""The SQLite store: schema and migrations, WAL and foreign keys, one-line errors for bad paths and
locks, two processes writing at once, transactions, and the order prompts are offered for labeling."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rlhf.store import schema as store_module
from rlhf.errors import StoreError
from rlhf.run_rows import Run, RunStatus, run_seconds
from rlhf.store import SCHEMA_VERSION, PromptItem, Store

NOBODY = 65534


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "rlhf.db"


@pytest.fixture
def empty_store(db_path: Path):
    with Store(db_path) as store:
        yield store


def _labelable(store: Store, text: str = "Say hi") -> tuple[int, int, int]:
    """A prompt with two responses: (prompt id, response A id, response B id)."""
    (prompt_id,), _ = store.add_prompts([PromptItem(text)], source="test")
    a = store.add_response(prompt_id, "hi", model="m")
    b = store.add_response(prompt_id, "hello", model="m")
    return prompt_id, a, b


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# -- schema, pragmas, migrations ----------------------------------------------------------------


def test_new_database_is_at_current_schema_in_wal_mode(empty_store: Store, db_path: Path):
    assert empty_store.schema_version == SCHEMA_VERSION >= 1
    with sqlite3.connect(db_path) as other:  # WAL is a property of the file, seen by any connection
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {"prompts", "responses", "comparisons", "runs", "metrics", "samples"} <= set(empty_store.db.table_names())


def test_foreign_keys_are_enforced(empty_store: Store):
    assert empty_store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        empty_store.add_response(12345, "orphan", model=None)


def test_old_database_migrates_forward_and_keeps_its_data(db_path: Path, monkeypatch):
    with Store(db_path) as old:
        prompt_id, a, b = _labelable(old)
        old.add_comparison(prompt_id, a, b, "b", annotator="ann")

    def add_difficulty(db):
        db.execute("ALTER TABLE prompts ADD COLUMN difficulty REAL")
        db.execute("UPDATE prompts SET difficulty = 0.5")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, add_difficulty])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with Store(db_path) as upgraded:
        assert upgraded.schema_version == SCHEMA_VERSION + 1
        assert upgraded.prompts()[0]["difficulty"] == 0.5
        assert upgraded.prompts()[0]["text"] == "Say hi"
        assert [c["choice"] for c in upgraded.comparisons()] == ["b"]
    with Store(db_path) as reopened:  # already migrated: the migration does not run twice
        assert reopened.schema_version == SCHEMA_VERSION + 1


def test_failed_migration_rolls_back_to_the_old_version(db_path: Path, monkeypatch):
    Store(db_path).close()

    def half_done(db):
        db.execute("ALTER TABLE prompts ADD COLUMN difficulty REAL")
        db.execute("SELECT no_such_function()")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, half_done])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="no_such_function"):
        Store(db_path)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "difficulty" not in [row[1] for row in conn.execute("PRAGMA table_info(prompts)")]


def test_database_from_a_newer_version_is_refused(db_path: Path):
    Store(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"v{SCHEMA_VERSION + 1} is newer.*upgrade rlhf-tui"):
        Store(db_path)


# -- paths that cannot hold a database ----------------------------------------------------------


def test_file_that_is_not_sqlite_is_refused(db_path: Path):
    db_path.write_text("prompt one\nprompt two\n" * 200, encoding="utf-8")
    with pytest.raises(StoreError, match="not a SQLite database") as err:
        Store(db_path)
    assert "\n" not in str(err.value)
    assert db_path.read_text(encoding="utf-8").startswith("prompt one")  # left untouched


def test_directory_in_place_of_the_file_is_refused(db_path: Path):
    db_path.mkdir()
    with pytest.raises(StoreError, match="is a directory"):
        Store(db_path)


def test_path_under_a_missing_directory_is_refused(tmp_path: Path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "no" / "such" / "rlhf.db")
    assert not (tmp_path / "no").exists()


def _open_error(path: Path) -> str | None:
    try:
        Store(path).close()
    except StoreError as exc:
        return str(exc)
    return None


def _open_error_unprivileged(path: Path) -> str | None:
    """`_open_error` in a process that permissions really bind (root ignores them: fork and drop to nobody)."""
    if os.geteuid() != 0:
        return _open_error(path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report "ok", "error:<message>" or "skip:<why>", then leave without pytest's cleanup
        try:
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as exc:
                os.write(write_end, f"skip:cannot drop root ({exc})".encode())
            else:
                message = _open_error(path)
                os.write(write_end, ("ok" if message is None else f"error:{message}").encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    os.waitpid(pid, 0)
    if report.startswith("skip:"):
        pytest.skip(report[5:])
    return None if report == "ok" else report.removeprefix("error:")


@pytest.fixture
def shared_dir():
    """A directory the unprivileged process can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="rlhf-store-test-"))
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(stat.S_IRWXU | (p.stat().st_mode & 0o777))
    shutil.rmtree(path)


def _owned_by_unprivileged_user(*paths: Path) -> None:
    if os.geteuid() == 0:
        for p in paths:
            os.chown(p, NOBODY, NOBODY)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_read_only_database_file_is_refused_at_open(shared_dir: Path):
    db = shared_dir / "rlhf.db"
    Store(db).close()
    _owned_by_unprivileged_user(shared_dir, db)
    assert _open_error_unprivileged(db) is None  # the setup is right: writable, it opens
    db.chmod(0o444)
    message = _open_error_unprivileged(db)
    assert message is not None and "read-only" in message and "\n" not in message


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_read_only_directory_is_refused_at_open(shared_dir: Path):
    db = shared_dir / "rlhf.db"
    Store(db).close()  # a clean close leaves no -wal/-shm: reopening must create them
    _owned_by_unprivileged_user(shared_dir, db)
    shared_dir.chmod(0o555)
    for path in (db, shared_dir / "new.db"):
        message = _open_error_unprivileged(path)
        assert message is not None and "cannot write here" in message, path


# -- locks and concurrent writers ---------------------------------------------------------------


def test_write_blocked_past_the_busy_timeout_says_locked(db_path: Path):
    Store(db_path).close()
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with Store(db_path, busy_timeout_s=0.2) as store:
            started = time.monotonic()
            with pytest.raises(StoreError, match="locked by another process for more than 0.2s"):
                store.add_prompts([PromptItem("blocked")], source="test")
            assert time.monotonic() - started >= 0.2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with Store(db_path, busy_timeout_s=0.2) as store:  # lock gone: the same write goes through
        store.add_prompts([PromptItem("blocked")], source="test")
        assert len(store.prompts()) == 1


def _write_comparisons(db_path: str, writer: str, ids: tuple[int, int, int], count: int, ready) -> None:
    with Store(db_path) as store:
        ready.wait(60)  # both writers start together, after their slow imports
        for i in range(count):
            store.add_comparison(*ids, "a", annotator=writer, note=str(i))


def test_two_processes_write_labels_at_once(db_path: Path):
    with Store(db_path) as store:
        ids = _labelable(store)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(2)
    writers = [ctx.Process(target=_write_comparisons, args=(str(db_path), f"w{n}", ids, 200, ready))
               for n in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    with Store(db_path) as store:
        rows = store.comparisons()
    for writer in ("w0", "w1"):
        assert sorted(int(r["note"]) for r in rows if r["annotator"] == writer) == list(range(200))


# -- transactions and queries -------------------------------------------------------------------


def test_transaction_commits_all_or_nothing(empty_store: Store, db_path: Path):
    with pytest.raises(RuntimeError):
        with empty_store.transaction():
            prompt_id, a, b = _labelable(empty_store)  # each call commits alone outside a transaction
            empty_store.add_comparison(prompt_id, a, b, "a")
            raise RuntimeError("interrupted half way")
    assert [_count(db_path, t) for t in ("prompts", "responses", "comparisons")] == [0, 0, 0]
    with empty_store.transaction():
        _labelable(empty_store)
    assert [_count(db_path, t) for t in ("prompts", "responses")] == [1, 2]


def test_each_label_is_on_disk_when_add_comparison_returns(empty_store: Store, db_path: Path):
    prompt_id, a, b = _labelable(empty_store)
    empty_store.add_comparison(prompt_id, a, b, "tie")
    assert _count(db_path, "comparisons") == 1  # a second connection sees it: committed


def test_add_prompts_skips_duplicates_in_the_batch_and_in_the_store(empty_store: Store):
    first, dup = empty_store.add_prompts([PromptItem("a"), PromptItem(" a "), PromptItem("b")], source="t")
    assert dup == 1 and first[0] == first[1] != first[2]
    again, dup = empty_store.add_prompts([PromptItem("b"), PromptItem("c")], source="t")
    assert dup == 1 and again[0] == first[2]
    chat = PromptItem("a", messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a"}])
    (chat_id,), dup = empty_store.add_prompts([chat], source="t")  # same text, different conversation
    assert dup == 0 and chat_id not in first
    assert [p["text"] for p in empty_store.prompts()] == ["a", "b", "c", "a"]


def test_preference_pairs_orient_chosen_and_filter_choices(empty_store: Store):
    prompt_id, a, b = _labelable(empty_store)
    for choice in ("a", "b", "tie", "both_bad", "skip"):
        empty_store.add_comparison(prompt_id, a, b, choice, margin=1.5 if choice == "b" else None)
    decided = empty_store.preference_pairs()
    assert [(p["choice"], p["chosen"], p["rejected"]) for p in decided] == [("a", "hi", "hello"),
                                                                              ("b", "hello", "hi")]
    assert decided[1]["margin"] == 1.5 and decided[1]["chosen_id"] == b
    assert [p["choice"] for p in empty_store.preference_pairs(include_ties=True)] == ["a", "b", "tie"]


def test_bad_choice_is_refused(empty_store: Store):
    prompt_id, a, b = _labelable(empty_store)
    with pytest.raises(StoreError, match="choice must be one of"):
        empty_store.add_comparison(prompt_id, a, b, "left")


def test_metrics_and_samples_are_stored_per_step(empty_store: Store):
    run_id = empty_store.create_run("ppo", {"lr": 1e-5}, total_steps=2)
    empty_store.log_metrics(run_id, 1, {"kl": 0.5, "score": 1.0})
    empty_store.log_metrics(run_id, 2, {"kl": 0.25})
    empty_store.add_samples(run_id, 2, [{"prompt": "p", "response": "r", "score": 0.3, "kl": 0.1}])
    assert empty_store.metrics_by_step(run_id) == {1: {"kl": 0.5, "score": 1.0}, 2: {"kl": 0.25}}
    assert empty_store.metrics_by_step(run_id, after_step=1) == {2: {"kl": 0.25}}
    assert [(s["step"], s["response"]) for s in empty_store.samples(run_id)] == [(2, "r")]


def test_runs_come_back_typed_with_their_status(empty_store: Store):
    reward = empty_store.create_run("reward", {"reward": {"epochs": 2}}, total_steps=4)
    time.sleep(0.002)  # started later: listed after
    ppo = empty_store.create_run("ppo", {}, total_steps=3, parent_run=reward)
    empty_store.update_run(reward, status="finished", step=4, checkpoint="runs/r/reward", checkpoint_step=4)
    run = empty_store.run(reward)
    assert isinstance(run, Run) and run.status is RunStatus.FINISHED and run.status == "finished"
    assert (run.kind, run.config, run.step, run.total_steps, run.checkpoint, run.pid) == (
        "reward", {"reward": {"epochs": 2}}, 4, 4, "runs/r/reward", os.getpid())
    assert run.ended_at and run.status.is_final and not run.status.can_resume
    child = empty_store.run(ppo)
    assert (child.parent_run, child.status, child.status.is_final) == (reward, RunStatus.RUNNING, False)
    assert [r.id for r in empty_store.runs()] == [reward, ppo] and empty_store.runs("ppo") == [child]
    assert run.to_dict()["status"] == "finished" and run.to_dict()["config"] == {"reward": {"epochs": 2}}
    with pytest.raises(ValueError, match="'done' is not a valid RunStatus"):
        empty_store.update_run(ppo, status="done")


def test_which_reward_run_is_the_newest_finished_one_or_the_one_named(empty_store: Store):
    with pytest.raises(StoreError, match="no finished reward run: train one with `rlhf-tui train-reward`"):
        empty_store.finished_reward_run()
    ids = []
    for i in range(3):
        time.sleep(0.002)  # each started after the one before
        ids.append(empty_store.create_run("reward", {}, run_id=f"reward-{i}"))
    older, stopped, newer = ids
    for run_id in (older, newer):
        empty_store.update_run(run_id, status="finished")
    empty_store.update_run(stopped, status="stopped")
    assert [run.id for run in empty_store.finished_reward_runs()] == [newer, older]
    assert empty_store.finished_reward_run().id == newer and empty_store.finished_reward_run(older).id == older
    with pytest.raises(StoreError, match=f"run '{stopped}' is a stopped reward run, not a finished reward run"):
        empty_store.finished_reward_run(stopped)


def test_a_resumed_run_counts_only_the_time_it_ran(empty_store: Store):
    run_id = empty_store.create_run("ppo", {}, total_steps=4)
    started = datetime.fromisoformat(empty_store.run(run_id).started_at)
    empty_store.update_run(run_id, status="stopped", ended_at=(started + timedelta(seconds=30)).isoformat())
    assert run_seconds(empty_store.run(run_id), started + timedelta(hours=5)) == 30.0  # stopped: the clock stands
    empty_store.resume_run(run_id, 0)  # hours later: the stopped time is not running time
    run = empty_store.run(run_id)
    session = datetime.fromisoformat(run.session_started_at)
    assert run.earlier_seconds == 30.0 and run.ended_at is None and session >= started
    assert run_seconds(run, session + timedelta(seconds=5)) == 35.0


def test_a_version_2_database_gains_the_timing_of_resumed_runs(db_path: Path):
    with sqlite3.connect(db_path) as conn:  # a database as rlhf-tui with schema v2 left it
        store_module._migrate_0_to_1(store_module.sqlite_utils.Database(conn))
        store_module._migrate_1_to_2(store_module.sqlite_utils.Database(conn))
        conn.execute("INSERT INTO runs (id, kind, config, status, step, started_at, ended_at) VALUES "
                     "('ppo-1', 'ppo', '{}', 'stopped', 3, '2026-01-01T10:00:00+00:00', '2026-01-01T10:01:00+00:00')")
        conn.execute("PRAGMA user_version = 2")
    with Store(db_path) as store:
        run = store.run("ppo-1")
        assert (run.earlier_seconds, run.session_started_at) == (0.0, None)
        assert run_seconds(run, datetime.now(timezone.utc)) == 60.0


def test_labeling_order_puts_unseen_prompts_first(empty_store: Store):
    ids, _ = empty_store.add_prompts([PromptItem(f"prompt {i}") for i in range(12)], source="t")
    twice, once_skipped = ids[0], ids[1]
    for prompt_id, choices in ((twice, ("a", "b")), (once_skipped, ("skip",))):
        a = empty_store.add_response(prompt_id, "x", model=None)
        b = empty_store.add_response(prompt_id, "y", model=None)
        for choice in choices:
            empty_store.add_comparison(prompt_id, a, b, choice)

    order = empty_store.prompt_order_for_labeling(seed=7)
    assert sorted(order[:10]) == sorted(ids[2:]) and order[10:] == [once_skipped, twice]
    assert empty_store.prompt_order_for_labeling(seed=7) == order
    assert empty_store.prompt_order_for_labeling(seed=8)[:10] != order[:10]  # the seed shuffles within a count
    without = empty_store.prompt_order_for_labeling(seed=7, exclude=[ids[2], twice])
    assert sorted(without[:9]) == sorted(ids[3:]) and without[9:] == [once_skipped]
