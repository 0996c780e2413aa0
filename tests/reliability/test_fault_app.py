"""The app must not lose labels or invent them: keys count only on pairs the person could read, a deleted
database is noticed, signals stop a run like Ctrl+Q, a stopped engine is reported, bad guidelines do not stop
the app. Driven through Textual's Pilot against a real engine process on the tiny model (issue 11, items 4-8,
10, app side)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from textual import events
from textual.widgets import Markdown, TextArea

from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens.dialogs import NoteModal
from rlhf_tui.app.screens.label import MIN_LOOK_MS
from rlhf.errors import StoreError
from rlhf.store import PromptItem, Store
from test_label_screen import (ENGINE_TIMEOUT_S, ROOT, make_workspace, ready_to_decide, rows, wait_ready_to_decide,
                               wait_until)


def notices(app: RlhfApp) -> list[str]:
    """Every notification the app showed (and has not yet expired)."""
    return [str(n.message) for n in app._notifications]


@asynccontextmanager
async def labeling_with_pairs_ready(workspace):
    """The app on the Label screen with a readable pair and two more ready: (app, pilot, label screen)."""
    app = RlhfApp(workspace, make_workspace(workspace, prompts=6, prefetch=3), annotator="ann")
    async with app.run_test(size=(120, 36)) as pilot:
        screen = app.screen
        await wait_until(pilot, lambda: ready_to_decide(screen) and len(screen.queue) >= 2, ENGINE_TIMEOUT_S,
                         "a readable pair and two ready ones")
        yield app, pilot, screen


async def test_keys_faster_than_a_person_can_read_are_refused(workspace):
    async with labeling_with_pairs_ready(workspace) as (app, pilot, screen):
        first = screen.current
        for _ in range(20):  # a held-down key: 20 presses as fast as the terminal sends them
            app.post_message(events.Key("a", "a"))
        await wait_until(pilot, lambda: screen.current is not first and screen.visible_since is not None,
                         what="the next pair, painted")
        app.post_message(events.Key("a", "a"))  # at once: the pair is on screen but cannot have been read yet
        await pilot.pause(0.3)
        stored = rows(workspace)
        assert len(stored) == 1  # the first press, on a pair shown long enough
        assert stored[0]["decision_ms"] >= MIN_LOOK_MS
        # The burst was typed before the next pair was painted: those keys were meant for the pair before.
        dropped = [n for n in notices(app) if n.startswith("key dropped: it was typed before this pair")]
        assert len(dropped) == 1  # one notice for the burst, not a stack of 19 over the pair
        assert any(n.startswith("too fast: look at the pair first") for n in notices(app))
        await wait_ready_to_decide(pilot, screen)
        await pilot.press("b")
        assert [r["choice"] for r in rows(workspace)] == ["a", "b"]
        assert all(r["decision_ms"] >= MIN_LOOK_MS for r in rows(workspace))


async def test_keys_typed_during_a_database_stall_are_dropped_not_replayed(workspace):
    async with labeling_with_pairs_ready(workspace) as (app, pilot, screen):
        # Another process holds the write lock for 1.5 s: the decision waits on it (the busy timeout) and the
        # UI stalls meanwhile, while the person goes on typing.
        blocker = sqlite3.connect(workspace.db_path, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        threading.Timer(1.5, blocker.rollback).start()
        decided = screen.current
        for key in "abbt":
            app.post_message(events.Key(key, key))  # typed while the first one waits
        await wait_until(pilot, lambda: rows(workspace), 30, "the stalled decision")
        await pilot.pause(0.5)
        blocker.close()
        stored = rows(workspace)
        assert [(r["choice"], r["response_a_id"]) for r in stored] == [("a", decided.a.id)]
        assert any(n.startswith("key dropped: it was typed before this pair was on screen") for n in notices(app))


async def test_no_decision_while_the_terminal_is_too_small_to_show_the_answers(workspace):
    cfg = make_workspace(workspace, prompts=4, prefetch=1)
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(40, 10)) as pilot:
        screen = app.screen
        await wait_until(pilot, lambda: screen.current is not None, ENGINE_TIMEOUT_S, "a pair")
        await pilot.pause(MIN_LOOK_MS / 1000 + 0.2)
        await pilot.press("b")
        assert rows(workspace) == []
        assert "enlarge the terminal (now 40x10): the prompt and both answers must be on screen to decide" in notices(
            app)
        await pilot.resize_terminal(110, 30)
        await wait_ready_to_decide(pilot, screen)
        await pilot.press("b")
        assert [r["choice"] for r in rows(workspace)] == ["b"]


async def test_a_pasted_15_kb_note_keeps_every_line_and_hides_no_answer(workspace):
    cfg = make_workspace(workspace, prompts=4, prefetch=1)
    app = RlhfApp(workspace, cfg, annotator="ann")
    note = "\n".join(f"line {i}: the answer repeats itself and ignores the question" for i in range(250))
    assert len(note) > 15_000
    async with app.run_test(size=(120, 36)) as pilot:
        screen = app.screen
        await wait_ready_to_decide(pilot, screen, ENGINE_TIMEOUT_S)
        await pilot.press("n")
        assert isinstance(app.screen, NoteModal)
        app.screen.query_one(TextArea).focus()
        app.post_message(events.Paste(note))
        await pilot.pause(0.2)
        await pilot.press("enter")
        assert app.screen is screen and screen.pending_note == note
        shown = str(screen.query_one("#notice").render())  # a preview, not 250 lines over the answers
        assert "note: line 0: the answer repeats itself" in shown and "(+249 more lines)" in shown
        assert "line 1:" not in shown
        await wait_ready_to_decide(pilot, screen)  # the answers are on screen: the pair can be decided
        await pilot.press("a")
        assert rows(workspace)[-1]["note"] == note


async def test_unreadable_or_foreign_guidelines_are_a_notice_not_a_crash(workspace):
    cfg = make_workspace(workspace, prompts=2, prefetch=0)
    (workspace.root / "guidelines.md").write_bytes("Pr\xe9f\xe9rez la r\xe9ponse polie".encode("latin-1"))
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(120, 36)) as pilot:  # today: UnicodeDecodeError, the app does not start
        screen = app.screen
        message = ("[label] guidelines = 'guidelines.md' is not UTF-8 text (byte 0xe9 at offset 2): save it as "
                   "UTF-8")
        assert message in notices(app)
        await pilot.press("question_mark")
        help_text = app.screen.query_one(Markdown).source
        assert "could not be shown" in help_text and message in help_text
        await pilot.press("escape")
        assert app.screen is screen

    cfg.label.guidelines = "/etc/passwd"  # a readable file outside the workspace: never shown
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(120, 36)) as pilot:
        assert any(n.startswith("[label] guidelines = '/etc/passwd' is outside the workspace") for n in notices(app))
        await pilot.press("question_mark")
        assert "root:" not in app.screen.query_one(Markdown).source


async def test_a_database_deleted_while_labeling_is_written_back_with_every_label(workspace):
    cfg = make_workspace(workspace, prompts=6, prefetch=2)
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(120, 36)) as pilot:
        screen = app.screen
        for key in "ab":
            await wait_ready_to_decide(pilot, screen, ENGINE_TIMEOUT_S)
            await pilot.press(key)
        for suffix in ("", "-wal", "-shm"):  # `rm rlhf.db*` while the app runs
            Path(f"{workspace.db_path}{suffix}").unlink(missing_ok=True)
        said = ("rlhf.db was deleted while the app ran: wrote it back with every label (2 comparisons); the engine "
                "restarts to use it")
        await wait_until(pilot, lambda: said in notices(app), 10, "the notice")
        assert workspace.db_path.exists()
        await wait_ready_to_decide(pilot, screen, ENGINE_TIMEOUT_S)
        await pilot.press("t")
        await wait_ready_to_decide(pilot, screen, ENGINE_TIMEOUT_S, "a pair from the restarted engine")
        await pilot.press("x")
        assert screen.labeled_session == 4
    conn = sqlite3.connect(workspace.db_path)  # after the app exited: the file is there, whole
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
    assert [r["choice"] for r in rows(workspace)] == ["a", "b", "tie", "both_bad"]


def test_a_database_replaced_while_open_is_saved_beside_it_and_the_new_file_left_alone(store, workspace):
    store.add_prompts([PromptItem("kept?")], "test")
    workspace.db_path.unlink()
    Path(f"{workspace.db_path}-wal").unlink(missing_ok=True)
    workspace.db_path.write_bytes(b"someone else's file")
    assert not store.still_on_disk()
    with pytest.raises(StoreError, match="another file took the database's place while it was open: saved the "
                                         r"database to rlhf\.db\.recovered-\d+"):
        store.restore_to_disk()
    assert workspace.db_path.read_bytes() == b"someone else's file"
    (recovered,) = workspace.root.glob("rlhf.db.recovered-*")
    with Store(recovered) as copy:
        assert [p["text"] for p in copy.prompts()] == ["kept?"]


RUN_AND_WAIT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from rlhf.config import Workspace
    from rlhf.engine import protocol
    from rlhf_tui.app.main import RlhfApp

    async def main(workspace, progress_path):
        ws = Workspace(workspace)
        app = RlhfApp(ws, ws.load_config(), annotator="signalled")
        async with app.run_test() as pilot:
            while app.engine.pid is None or app.screen.engine_info is None:
                await pilot.pause(0.1)
            app.engine.send(protocol.StartPPO(app.config.override({"ppo.steps": 500})))
            while app.is_running:  # until the signal makes the app exit
                running = sorted(app.engine.running_runs)
                if running and app.store.run(running[0]).step >= 1:
                    with open(progress_path, "w") as progress:
                        progress.write(running[0])
                await asyncio.sleep(0.1)
        sys.exit(app.return_code)

    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "whole_group"), [(signal.SIGHUP, True), (signal.SIGTERM, False)],
                         ids=["SIGHUP to the terminal's process group", "SIGTERM to the app"])
def test_a_closed_terminal_or_sigterm_stops_the_run_with_a_checkpoint_like_ctrl_q(rewarded, tmp_path, signum,
                                                                                   whole_group):
    workspace, _ = rewarded
    script, progress = tmp_path / "run_and_wait.py", tmp_path / "progress.txt"
    script.write_text(RUN_AND_WAIT_SCRIPT, encoding="utf-8")
    app = subprocess.Popen([sys.executable, str(script), str(workspace.root), str(progress)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while not progress.exists() or not progress.read_text():
            assert app.poll() is None, app.stderr.read()
            assert time.monotonic() < deadline, "no PPO step in time"
            time.sleep(0.1)
        # A closed terminal hangs up its whole foreground process group: the app and its engine.
        os.killpg(app.pid, signum) if whole_group else app.send_signal(signum)
        assert app.wait(timeout=120) == 128 + signum, app.stderr.read()
    finally:
        app.kill()
    with Store(workspace.db_path) as store:
        run = store.run(progress.read_text())
    assert run.status == "stopped", run  # was: left "running", later "interrupted ... without saying why"
    assert run.checkpoint_step == run.step >= 1
    assert (workspace.root / run.checkpoint).is_dir()


async def test_a_stopped_engine_is_reported_with_the_restart_key(workspace):
    cfg = make_workspace(workspace, prompts=4, prefetch=0)
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(120, 36)) as pilot:
        screen = app.screen
        app.engine.unresponsive_after_s = 2.0  # 10 s in use; short here to keep the test quick
        await wait_ready_to_decide(pilot, screen, ENGINE_TIMEOUT_S)
        stopped_pid = app.engine.pid
        os.kill(stopped_pid, signal.SIGSTOP)  # `kill -STOP`, or a laptop's frozen process
        try:
            await pilot.press("a")  # the next pair never comes: today "sampling the next pair…" forever
            await wait_until(pilot, lambda: screen.engine_silence is not None, 30, "the silence noticed")
            message = str(screen.query_one("#engine-message").render())
            assert message.startswith("The engine is not responding (no answer for ") and "ctrl+r" in message
            assert app.check_action("restart_engine", ()) is True  # the key is in the footer
            await pilot.press("ctrl+r")
            await wait_ready_to_decide(pilot, screen, ENGINE_TIMEOUT_S, "a pair from the new engine")
            assert screen.engine_silence is None and app.engine.pid != stopped_pid
            await pilot.press("b")
            assert [r["choice"] for r in rows(workspace)] == ["a", "b"]
        finally:
            try:
                os.kill(stopped_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
