"""The Label screen's layout (issue 14, item 6): the footer shows whole keys only, the decisions, undo and help
always (from 80 columns), every key at 120, in each state of the screen; keys it leaves out still work. The answer
panes are as tall as their text, within the room there is. Pilot against a real engine."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

from rlhf.engine import protocol
from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens.dialogs import HelpScreen, NoteModal
from rlhf_tui.app.screens.label import LabelScreen
from rlhf_tui.app.widgets.answer import TextPane
from rlhf_tui.app.widgets.footer import FittingFooter
from test_label_screen import ENGINE_TIMEOUT_S, make_workspace, wait_until  # tests/ is on sys.path

WIDTH, HEIGHT = 120, 30
LONG_ANSWER = "\n".join(f"line {i} of a long answer" for i in range(80))


MUST_SHOW = ["a", "b", "t", "x", "s", "u", "question_mark"]  # the decisions, undo and help, in this order


def shown_keys(screen: LabelScreen) -> dict[str, tuple[int, int]]:
    """The keys the footer shows (not those it leaves out for want of room) and the columns each one spans."""
    footer = screen.query_one(FittingFooter)
    return {key.key: (key.region.x, key.region.right) for key in footer.query("FooterKey") if key.region}


def footer_order(*extra: str) -> list[str]:
    """The first key of every footer binding of the Label screen and then the app, in the footer's order; keys
    shown only in some states are left out unless named in `extra`."""
    situational = {"refit", "restart_engine"}
    keys = [(b.key.split(",")[0], b.id) for b in (*LabelScreen.BINDINGS, *RlhfApp.BINDINGS) if b.show]
    return [key for key, binding_id in keys if binding_id not in situational or key in extra]


def assert_footer_fits(screen: LabelScreen, width: int, *extra: str) -> None:
    """Every key shown fits the line, left to right in the footer's order: first the decisions, undo and help,
    always shown (as is ctrl+r when it is in `extra`); keys left out for want of room are the last ones; at 120
    columns none is left out."""
    shown = shown_keys(screen)
    assert max(right for _, right in shown.values()) <= width, shown
    in_order = sorted(shown, key=lambda key: shown[key][0])
    order = footer_order(*extra)
    assert in_order == [key for key in order if key in shown], str(shown)
    assert in_order[:len(MUST_SHOW)] == MUST_SHOW, in_order
    must = [*MUST_SHOW, *(key for key in extra if key == "ctrl+r")]
    assert set(must) <= set(shown), in_order
    optional = [key for key in order if key not in must]
    assert [key for key in in_order if key not in must] == optional[:len(shown) - len(must)], in_order
    if width >= WIDTH:
        assert in_order == order


async def assert_footer_fits_at_each_width(pilot, screen: LabelScreen, *extra: str) -> None:
    for width in (80, 100, WIDTH):
        await pilot.resize_terminal(width, HEIGHT)
        await pilot.pause()
        assert_footer_fits(screen, width, *extra)


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


async def test_label_screen_from_80_to_120_columns(workspace):
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

        # The footer at 80, 100 and 120 columns, in each state of the screen (one engine start for all).
        await assert_footer_fits_at_each_width(pilot, screen)  # no restart key while the engine is up
        # At 80 columns the footer leaves out note and resample: both keys still work.
        await pilot.resize_terminal(80, HEIGHT)
        await pilot.pause()
        assert {"n", "r"}.isdisjoint(shown_keys(screen))
        await pilot.press("n")
        assert isinstance(app.screen, NoteModal)
        await pilot.press("escape")
        old = screen.current
        await pilot.press("r")
        await wait_until(pilot, lambda: screen.current is not old, ENGINE_TIMEOUT_S, "the resampled pair")
        assert screen.current.regenerated and screen.current.prompt_id == old.prompt_id
        # The run's events as the engine sends them while a PPO run trains: the refit key joins the footer.
        screen.handle_engine_events([protocol.RunStarted("ppo-test", "ppo", 10)])
        await assert_footer_fits_at_each_width(pilot, screen, "f")
        os.kill(app.engine.pid, signal.SIGKILL)  # engine down: ctrl+r shows, refit (it could not run) goes
        await wait_until(pilot, lambda: screen.engine_error is not None, what="the death report")
        await assert_footer_fits_at_each_width(pilot, screen, "ctrl+r")
        # The keys the footer leaves out (the palette, the Stats screen, scrolling) and the long forms of the
        # short descriptions are in the help.
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        listed = {description: keys for keys, description in app.screen.keys}
        assert listed["Open the command palette"] == "^p" and listed["stats"] == "^t" and "scroll down" in listed
        assert listed["A much better (stored with margin 1.0)"] == "A"
        assert listed["regenerate: two fresh answers to this prompt"] == "r"
        assert listed["note"] == "n" and listed["screens"] == "tab"
        assert [description for _, description in app.screen.keys][:len(MUST_SHOW)] == [  # in the footer's order
            "A better", "B better", "tie", "both bad", "skip", "undo", "help: the guidelines and every key"]
