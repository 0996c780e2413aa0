"""The label screen driven by keys (Textual Pilot) against a real engine process and the tiny model."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_tui.app.main import RlhfApp, keymap_problems, read_guidelines
from rlhf_tui.app.screens import TABS
from rlhf_tui.app.screens.dialogs import HelpScreen, NoteModal
from rlhf_tui.app.screens.label import (MIN_LOOK_MS, STRONG_MARGIN, LabelScreen, decision_ms, early_key_refusal, note_preview,
                               pairs_to_request)
from rlhf_tui.app.widgets.answer import TextPane, visible_text
from rlhf.config import Config, Workspace
from rlhf.store import PromptItem, Store
from test_engine import pid_running  # tests/ is on sys.path (pytest's rootdir-relative import)

ROOT = Path(__file__).resolve().parents[1]
ENGINE_TIMEOUT_S = 300  # generous: a cold, low-priority engine imports torch and loads the model first
PAIR_TIMEOUT_S = 120


# -- pure functions ------------------------------------------------------------------------------


def test_decision_ms():
    assert decision_ms(10.0, 10.25) == 250
    assert decision_ms(10.0, 10.0004) == 0
    assert decision_ms(10.0, 9.0) == 0  # never negative


def test_early_key_refusal():
    assert early_key_refusal(10.0, 10.25, min_look_ms=250) is None
    assert early_key_refusal(10.0, 12.0, min_look_ms=250) is None
    assert early_key_refusal(10.0, 10.249, min_look_ms=250).startswith("too fast: look at the pair first")
    assert early_key_refusal(10.0, 9.5, min_look_ms=250).startswith("key dropped")  # typed before the paint
    assert early_key_refusal(None, 10.0, min_look_ms=250).startswith("key dropped")  # not painted whole yet


def test_note_preview():
    assert note_preview("too short") == "too short"
    assert note_preview("x" * 100, limit=10) == "x" * 9 + "…"
    assert note_preview("first\nsecond\nthird") == "first (+2 more lines)"


def test_read_guidelines(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    assert read_guidelines(root, "guidelines.md") == (None, None)  # no file: the help says how to write one
    (root / "guidelines.md").write_text("# Be kind", encoding="utf-8")
    assert read_guidelines(root, "guidelines.md") == ("# Be kind", None)
    (root / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    assert read_guidelines(root, "latin1.md") == (
        None, "[label] guidelines = 'latin1.md' is not UTF-8 text (byte 0xe9 at offset 3): save it as UTF-8")
    (root / "folder").mkdir()
    assert read_guidelines(root, "folder")[1].startswith("[label] guidelines = 'folder' is not a regular file")
    (tmp_path / "secret").write_text("root:x:0", encoding="utf-8")
    (root / "link.md").symlink_to(tmp_path / "secret")
    for name in ("/etc/shadow", "../secret", "link.md"):
        text, problem = read_guidelines(root, name)
        assert text is None and problem.startswith(f"[label] guidelines = {name!r} is outside the workspace"), name


def test_pairs_to_request():
    assert pairs_to_request(prefetch=4, held=0, requested=0) == 5  # the one on screen + 4 ready
    assert pairs_to_request(prefetch=4, held=3, requested=0) == 2
    assert pairs_to_request(prefetch=4, held=6, requested=0) == 0
    assert pairs_to_request(prefetch=4, held=0, requested=2) == 0  # one request at a time
    assert pairs_to_request(prefetch=0, held=0, requested=0) == 1  # on demand
    assert pairs_to_request(prefetch=0, held=1, requested=0) == 0


def test_visible_text_neutralises_control_characters():
    assert visible_text("a\x1b[2Jb\x00c\x7f\nd\te") == "a\u241b[2Jb\u2400c\u2421\nd\te"


def test_keymap_problems():
    known = {"prefer_a", "tie"}
    assert keymap_problems({"prefer_a": "j,down", "tie": "y"}, known) == []
    assert keymap_problems({"prefer_z": "j", "tie": ["y"]}, known) == [
        "unknown binding id 'prefer_z'", "'tie' must map to keys in a string, e.g. \"j,down\""]


# -- the screen with a real engine -------------------------------------------------------------


def make_workspace(workspace: Workspace, prompts: int, *, prefetch: int, keymap: str = "",
                   guidelines: str | None = None) -> Config:
    with workspace.config_path.open("a") as f:
        f.write(f"[sampling]\nmax_new_tokens = 4\nprefetch = {prefetch}\ntemperature = 1.5\n"
                f"[label]\nkeymap = {{{keymap}}}\n")
    if guidelines is not None:
        (workspace.root / "guidelines.md").write_text(guidelines, encoding="utf-8")
    with Store(workspace.db_path) as store:
        store.add_prompts([PromptItem(f"Question {i}: how do I boil eggs?") for i in range(prompts)], "test")
    return workspace.load_config()


async def wait_until(pilot, predicate, timeout_s: float = PAIR_TIMEOUT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def ready_to_decide(screen: LabelScreen) -> bool:
    """A pair has been on screen long enough for a decision key to count (with a margin for a busy box)."""
    return screen.current is not None and (screen.visible_ms() or 0) >= MIN_LOOK_MS + 50


async def wait_ready_to_decide(pilot, screen: LabelScreen, timeout_s: float = PAIR_TIMEOUT_S, what: str = "a pair"):
    await wait_until(pilot, lambda: ready_to_decide(screen), timeout_s, what)


def rows(workspace: Workspace) -> list[dict]:
    with Store(workspace.db_path) as store:
        return store.comparisons()


def response(workspace: Workspace, response_id: int) -> dict:
    with Store(workspace.db_path) as store:
        return store.response(response_id)


# Every decision key, with its choice and margin; `z` is a keymap addition (both_bad = "x,0,z").
DECISION_KEYS = [("a", "a", None), ("1", "a", None), ("left", "a", None), ("b", "b", None), ("2", "b", None),
                 ("right", "b", None), ("A", "a", STRONG_MARGIN), ("B", "b", STRONG_MARGIN), ("t", "tie", None),
                 ("equals_sign", "tie", None), ("x", "both_bad", None), ("0", "both_bad", None),
                 ("z", "both_bad", None), ("s", "skip", None), ("space", "skip", None)]


async def test_every_key_against_a_real_engine(workspace, tiny_model_dir):
    cfg = make_workspace(workspace, prompts=5, prefetch=2, keymap='both_bad = "x,0,z"',
                         guidelines="# Guidelines\n\nPrefer the answer that **helps**.")
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(140, 40)) as pilot:
        # Guidelines are shown at first start (no comparisons yet); ? shows them again.
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        screen = app.screen
        assert isinstance(screen, LabelScreen)
        await wait_until(pilot, lambda: screen.current is not None, ENGINE_TIMEOUT_S, "the first pair")
        assert [p.border_title for p in screen.query(TextPane)] == ["prompt", "A", "B"]  # blind sides
        assert "tokens" in screen.query_one("#answer-a", TextPane).border_subtitle
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert app.screen is screen

        sides_seen = set()
        for key, choice, margin in DECISION_KEYS:
            await wait_ready_to_decide(pilot, screen, what=f"a pair before {key!r}")
            pair, before = screen.current, len(rows(workspace))
            await pilot.press(key)
            after = rows(workspace)
            assert len(after) == before + 1, key
            row = after[-1]
            assert (row["choice"], row["margin"]) == (choice, margin), key
            assert (row["prompt_id"], row["response_a_id"], row["response_b_id"]) == (pair.prompt_id, pair.a.id,
                                                                                      pair.b.id)
            assert row["annotator"] == "ann" and row["source"] == "label"
            assert MIN_LOOK_MS <= row["decision_ms"] < 60_000
            for response_id in (row["response_a_id"], row["response_b_id"]):
                stored = response(workspace, response_id)
                assert stored["model"] == str(tiny_model_dir) and stored["sampling"]["temperature"] == 1.5
                assert stored["seed"] is not None and stored["prompt_id"] == pair.prompt_id
            sides_seen.add(row["response_a_id"] < row["response_b_id"])
            assert screen.current is not pair
        assert sides_seen == {True, False}  # generation order and side A differ sometimes: sides are shuffled
        assert screen.labeled_session == len(DECISION_KEYS)

        # Undo (u, backspace) deletes exactly the last row and brings its pair back.
        await wait_ready_to_decide(pilot, screen, what="a pair before undo")
        all_rows = rows(workspace)
        await pilot.press("u")
        assert rows(workspace) == all_rows[:-1]
        assert screen.current.a.id == all_rows[-1]["response_a_id"]
        await pilot.press("backspace")
        assert rows(workspace) == all_rows[:-2]
        assert screen.current.a.id == all_rows[-2]["response_a_id"]

        # A note stays with the pair and is stored with the decision on it.
        await pilot.press("n")
        assert isinstance(app.screen, NoteModal)
        await pilot.press(*"too", "space", *"short", "enter")
        assert app.screen is screen and screen.pending_note == "too short"
        noted_pair = screen.current
        await wait_ready_to_decide(pilot, screen)
        await pilot.press("t")
        last = rows(workspace)[-1]
        assert (last["note"], last["choice"], last["response_a_id"]) == ("too short", "tie", noted_pair.a.id)

        # Regenerate stores two new answers for the same prompt and shows them.
        await wait_until(pilot, lambda: screen.current is not None, what="a pair before regenerate")
        old = screen.current
        await pilot.press("r")
        await wait_until(pilot, lambda: screen.current is not old, what="the regenerated pair")
        await wait_ready_to_decide(pilot, screen, what="the regenerated pair, readable")
        fresh = screen.current
        assert fresh.regenerated and fresh.prompt_id == old.prompt_id
        assert min(fresh.a.id, fresh.b.id) > max(old.a.id, old.b.id)
        await pilot.press("b")
        assert rows(workspace)[-1]["response_b_id"] == fresh.b.id
        decisions = list(screen.history)

        # tab / shift+tab cycle the screens; the label screen keeps its state meanwhile.
        await pilot.press("tab")
        assert app.current_mode == TABS[1].name
        await pilot.press("shift+tab")
        assert app.current_mode == "label" and app.screen is screen and screen.history == decisions
        engine_pid = app.engine.pid
    assert not app.engine.alive  # exiting the app stopped the engine
    assert not pid_running(engine_pid)


async def test_engine_death_is_shown_and_restart_recovers(workspace):
    cfg = make_workspace(workspace, prompts=4, prefetch=1)
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(90, 30)) as pilot:  # narrow: answers stacked
        screen = app.screen
        assert screen.has_class("-narrow")
        await wait_until(pilot, lambda: ready_to_decide(screen) and screen.queue, ENGINE_TIMEOUT_S,
                         "a pair and a prefetched one")
        assert screen.query_one("#answer-a").region.y < screen.query_one("#answer-b").region.y
        os.kill(app.engine.pid, signal.SIGKILL)
        await wait_until(pilot, lambda: screen.engine_error is not None, what="the death report")
        assert "SIGKILL" in screen.engine_error
        assert app.check_action("restart_engine", ()) is True
        await pilot.press("a")  # pairs already here can still be labeled
        await wait_ready_to_decide(pilot, screen)
        await pilot.press("a")
        assert len(rows(workspace)) == 2 and screen.current is None
        await pilot.press("ctrl+r")
        await wait_ready_to_decide(pilot, screen, ENGINE_TIMEOUT_S, "a pair from the new engine")
        assert screen.engine_error is None
        await pilot.press("b")
        assert [r["choice"] for r in rows(workspace)] == ["a", "a", "b"]


LABELING_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from rlhf.config import Workspace
    from rlhf_tui.app.main import RlhfApp
    from rlhf_tui.app.screens.label import MIN_LOOK_MS

    async def main(workspace, progress_path):
        ws = Workspace(workspace)
        app = RlhfApp(ws, ws.load_config(), annotator="killed")
        async with app.run_test() as pilot:
            screen = app.screen
            with open(progress_path, "a") as progress:
                progress.write(f"engine {app.engine.pid}\\n")
                progress.flush()
                while True:
                    if screen.current is None or (screen.visible_ms() or 0) < MIN_LOOK_MS + 50:
                        await pilot.pause(0.05)
                        continue
                    await pilot.press("a")
                    # add_comparison has committed when the key's action returns
                    progress.write(f"decided {screen.history[-1].comparison_id}\\n")
                    progress.flush()

    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_mid_labeling_loses_no_decision_and_leaves_no_engine(workspace, tmp_path):
    make_workspace(workspace, prompts=6, prefetch=3)
    script, progress = tmp_path / "label_and_die.py", tmp_path / "progress.txt"
    script.write_text(LABELING_SCRIPT, encoding="utf-8")
    progress.touch()
    app = subprocess.Popen([sys.executable, str(script), str(workspace.root), str(progress)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while sum(line.startswith("decided") for line in progress.read_text().splitlines()) < 4:
            assert app.poll() is None, app.stderr.read()
            assert time.monotonic() < deadline, "the app made no 4 decisions in time"
            time.sleep(0.02)
        app.send_signal(signal.SIGKILL)  # mid-labeling: it keeps pressing keys until this lands
        app.wait()
    finally:
        app.kill()
    lines = progress.read_text().splitlines()
    engine_pid = int(lines[0].split()[1])
    decided = {int(line.split()[1]) for line in lines[1:] if line.startswith("decided")}
    conn = sqlite3.connect(workspace.db_path)  # the file as the kill left it opens and checks clean
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    stored = [r["id"] for r in rows(workspace)]
    assert decided <= set(stored)  # every reported decision was on disk
    assert len(stored) - len(decided) <= 1  # at most one committed in the instant before the kill
    deadline = time.monotonic() + 10
    while pid_running(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_running(engine_pid)
