"""The Label screen at 120 columns (issue 14, item 6): the footer holds every key in each state of the screen,
and the answer panes are as tall as their text, within the room there is. Pilot against a real engine."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

from textual.widgets import Footer

from rlhf.engine import protocol
from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens.dialogs import HelpScreen
from rlhf_tui.app.screens.label import LabelScreen
from rlhf_tui.app.widgets.answer import TextPane
from test_label_screen import ENGINE_TIMEOUT_S, make_workspace, wait_until  # tests/ is on sys.path

WIDTH, HEIGHT = 120, 30
LONG_ANSWER = "\n".join(f"line {i} of a long answer" for i in range(80))


def shown_keys(screen: LabelScreen) -> dict[str, tuple[int, int]]:
    """The footer's keys and the columns each one spans."""
    footer = screen.query_one(Footer)
    return {key.key: (key.region.x, key.region.right) for key in footer.query("FooterKey")}


def footer_keys(*extra: str) -> set[str]:
    """The first key of every footer binding of the Label screen and the app, plus `extra` (keys shown only in
    some states)."""
    situational = {"refit", "restart_engine"}
    return {b.key.split(",")[0] for b in (*RlhfApp.BINDINGS, *LabelScreen.BINDINGS)
            if b.show and b.id not in situational} | set(extra)


def assert_footer_fits(screen: LabelScreen, *extra: str) -> None:
    shown = shown_keys(screen)
    assert set(shown) == footer_keys(*extra)
    assert max(right for _, right in shown.values()) <= WIDTH, shown


async def test_with_no_prefetch_each_pair_becomes_decidable(workspace):
    """One pair at a time: each becomes decidable once painted, though no further event redraws the screen."""
    cfg = make_workspace(workspace, prompts=4, prefetch=0)
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(WIDTH, HEIGHT)) as pilot:
        screen = app.screen
        for decided in range(2):
            await wait_until(pilot, lambda: screen.visible_ms() is not None and screen.visible_ms() > 300,
                             ENGINE_TIMEOUT_S, "a decidable pair")
            await pilot.press("a")
            assert screen.labeled_session == decided + 1


async def test_answer_panes_sized_before_their_text_was_laid_out_recover(workspace):
    """Textual may run a screen's after-refresh callbacks before a newly shown text is laid out (a race seen under
    load in CI): panes measured then are a border tall and show no line, so the pair cannot be decided. Here that
    state is set by hand; layout itself must bring the panes to their text and make the pair decidable."""
    cfg = make_workspace(workspace, prompts=4, prefetch=0)
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(WIDTH, HEIGHT)) as pilot:
        screen = app.screen
        two_lines = protocol.ResponseView(2, "Ten minutes\nin boiling water.", 6)
        screen.handle_engine_events([protocol.PairReady(1, "Question 0: how do I boil eggs?",
                                                        protocol.ResponseView(1, "Boil them.", 3), two_lines)])
        await wait_until(pilot, lambda: screen.visible_ms() is not None, 30, "the pair readable")
        panes = [screen.query_one("#answer-a", TextPane), screen.query_one("#answer-b", TextPane)]
        for pane in panes:
            pane.styles.height = pane.styles.gutter.height  # what a measurement before layout gives
        screen.visible_since = None
        await wait_until(pilot, lambda: screen.visible_ms() is not None and screen.visible_ms() > 300, 30,
                         "the pair readable again")
        assert [pane.region.height for pane in panes] == [2 + 2, 2 + 2]  # the longer text and the border


async def test_label_screen_at_120_columns(workspace):
    cfg = make_workspace(workspace, prompts=4, prefetch=1)  # 4 new tokens: short answers
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(WIDTH, HEIGHT)) as pilot:
        screen = app.screen
        await wait_until(pilot, lambda: screen.current is not None, ENGINE_TIMEOUT_S, "the first pair")
        await pilot.pause()
        area = screen.query_one("#answer-area").region
        a, b = screen.query_one("#answer-a", TextPane), screen.query_one("#answer-b", TextPane)
        text_lines = max(pane.query_one(".pane-body").region.height for pane in (a, b))
        assert a.region.height == b.region.height == text_lines + 2  # the text and the border, both alike
        assert a.region.height <= area.height // 3  # not the whole room: it was the full height before

        async def show_answers(text_a: str, text_b: str) -> None:
            """The pair on screen with these texts, shown as the engine's regenerated pair would be."""
            pair = screen.current
            screen.handle_engine_events([replace(pair, a=replace(pair.a, text=text_a), b=replace(pair.b, text=text_b),
                                                 regenerated=True)])
            await pilot.pause()
            await pilot.pause()

        await show_answers(LONG_ANSWER, "short")  # the longer one sets both; the room there is caps it
        assert a.region.height == b.region.height == area.height
        assert a.max_scroll_y > 0
        await show_answers("one line", "two\nlines")  # and they shrink again
        assert a.region.height == b.region.height == 2 + 2

        await pilot.resize_terminal(80, HEIGHT)  # narrow: stacked, each at most half the room, both readable
        await pilot.pause()
        area = screen.query_one("#answer-area").region
        assert a.region.y < b.region.y and a.region.height <= area.height // 2 and b.region.bottom <= area.bottom
        assert screen._panes_readable()

        # The footer, back at 120 columns: every key, in each state of the screen (one engine start for both).
        await pilot.resize_terminal(WIDTH, HEIGHT)
        await pilot.pause()
        assert_footer_fits(screen)  # no restart key while the engine is up: it was drawn before the start
        # The run's events as the engine sends them while a PPO run trains: the refit key joins the footer.
        screen.handle_engine_events([protocol.RunStarted("ppo-test", "ppo", 10)])
        await pilot.pause()
        assert_footer_fits(screen, "f")
        os.kill(app.engine.pid, signal.SIGKILL)  # engine down: ctrl+r shows, refit (it could not run) goes
        await wait_until(pilot, lambda: screen.engine_error is not None, what="the death report")
        await pilot.pause()
        assert_footer_fits(screen, "ctrl+r")
        # The keys the footer leaves out (the palette, the Stats screen, scrolling) and the long forms of the
        # short descriptions are in the help.
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        listed = {description: keys for keys, description in app.screen.keys}
        assert listed["Open the command palette"] == "^p" and listed["stats"] == "^t" and "scroll down" in listed
        assert listed["A much better (stored with margin 1.0)"] == "A"
        assert listed["regenerate: two fresh answers to this prompt"] == "r"
