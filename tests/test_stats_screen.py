"""The Stats screen (issue 14, item 5): the figures of `rlhf-tui stats`, read from the store in the app process,
shown generically so that figures added to the report appear without a change. Hand-computed expectations."""

from __future__ import annotations

from textual.widgets import DataTable, Static

from rlhf.config import Workspace
from rlhf.store import PromptItem, Store
from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens.stats import (EMPTY, NO_LABELS, StatsScreen, columns_of, describe, flatten, format_value,
                                        position_bias_note)


def test_format_value():
    assert [format_value(v) for v in (None, True, 0.714, 12, "bob", [0.5512, 0.8421], ["alice", "bob"])] == \
        ["–", "yes", "0.71", "12", "bob", "0.55–0.84", "alice · bob"]
    assert format_value({"agree": 3, "n": 5, "share": 0.6, "wilson_95": [0.2307, 0.8824]}) == "3/5 0.60 (0.23–0.88)"
    assert format_value({"agree": 0, "n": 0, "share": None, "wilson_95": [0.0, 1.0]}) == "–"  # nothing judged


def test_flatten_spreads_nested_records_and_keeps_shares_whole():
    share = {"agree": 1, "n": 2, "share": 0.5, "wilson_95": [0.1, 0.9]}
    assert flatten({"a_share": 0.7, "a_share_wilson_95": [0.5, 0.8], "length_score": {"samples": 3},
                    "self_consistency": share}) == {
        "a share": {"share": 0.7, "wilson_95": [0.5, 0.8]}, "length score samples": 3, "self consistency": share}
    # share_with_interval's fields inside a larger record (the reward model's check) become one figure
    assert flatten({"reward_run": "r1", **share}) == {"agree": share, "reward run": "r1"}


def test_a_figure_the_screen_does_not_know_gets_its_own_column():
    records = [{"annotator": "a", "decisions": 3}, {"annotator": "b", "decisions": 1, "new_figure": {"x": 1.5}}]
    assert columns_of(records) == ["annotator", "decisions", "new figure x"]
    assert describe({"pairs": 4, "alpha": None, "new_figure": 0.25}) == "pairs 4 · new figure 0.25"


def test_position_bias_note_names_annotators_whose_interval_leaves_out_half():
    fair = {"annotator": "bob", "a_picks": 5, "b_picks": 5, "a_share": 0.5, "a_share_wilson_95": [0.2366, 0.7634]}
    biased = {"annotator": "alice", "a_picks": 9, "b_picks": 2, "a_share": 9 / 11,
              "a_share_wilson_95": [0.523, 0.9486]}
    no_picks = {"annotator": "carol", "a_picks": 0, "b_picks": 0, "a_share": None, "a_share_wilson_95": [0.0, 1.0]}
    assert position_bias_note([fair, no_picks]) is None
    assert position_bias_note([fair, biased]) == "position bias: alice (0.82, 95% 0.52–0.95)"


def label_as_alice(workspace: Workspace) -> None:
    """Ten pairs labeled by alice: A, but B on pair 0."""
    with Store(workspace.db_path) as store:
        ids, _ = store.add_prompts([PromptItem(f"Question {i}?") for i in range(10)], "test")
        for i, prompt_id in enumerate(ids):
            a, b = (store.add_response(prompt_id, f"{side} {i}", model=None) for side in ("first", "second"))
            store.add_comparison(prompt_id, a, b, "b" if i == 0 else "a", annotator="alice", decision_ms=2000)


def label_as_bob_and_repeat(workspace: Workspace) -> None:
    """bob labels alice's ten pairs with the same sides (B on pairs 0-4, else A); alice sees pair 5 again with
    the sides swapped and prefers the same answer."""
    with Store(workspace.db_path) as store:
        alice = store.comparisons()
        for i, first in enumerate(alice):
            store.add_comparison(first["prompt_id"], first["response_a_id"], first["response_b_id"],
                                 "b" if i < 5 else "a", annotator="bob", decision_ms=3000)
        fifth = alice[5]
        store.add_comparison(fifth["prompt_id"], fifth["response_b_id"], fifth["response_a_id"], "b",
                             annotator="alice", decision_ms=2000, repeat_of=fifth["id"])


def table_rows(screen: StatsScreen, table_id: str) -> list[list[str]]:
    table = screen.query_one(f"#{table_id}", DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def texts(screen: StatsScreen) -> list[str]:
    return [str(static.render()) for static in screen.query("#stats-body > Static").results(Static)]


async def test_the_stats_screen_shows_annotator_quality(workspace):
    with Store(workspace.db_path):
        pass  # an empty database: the screen says what to do
    app = RlhfApp(workspace, workspace.load_config(), annotator="alice")
    async with app.run_test(size=(120, 30)) as pilot:
        assert "Stats" in [command.title for command in app.get_system_commands(app.screen)]  # the palette
        await pilot.press("ctrl+t")
        screen = app.screen
        assert app.current_mode == "stats" and isinstance(screen, StatsScreen)
        assert NO_LABELS in texts(screen)

        label_as_alice(workspace)
        await pilot.press("r")
        assert [row[0] for row in table_rows(screen, "stats-annotators")] == ["alice"]
        assert EMPTY["agreement"] in texts(screen)

        label_as_bob_and_repeat(workspace)
        await pilot.press("r")
        assert texts(screen)[0].startswith("prompts 10 · responses ")  # the engine samples some too
        assert "comparisons 21 (a 14, b 7, tie 0, both_bad 0, skip 0)" in texts(screen)[0]
        # alice: 9 of 11 picks on side A, Wilson 0.523-0.9486; bob 5 of 10, 0.2366-0.7634 (by hand, see
        # test_position_bias_note...); alice's repeat agrees: 1/1, Wilson (0.2065, 1.0).
        assert table_rows(screen, "stats-annotators") == [
            ["alice", "11", "9", "2", "0.82 (0.52–0.95)", "2.00", "1/1 1.00 (0.21–1.00)"],
            ["bob", "10", "5", "5", "0.50 (0.24–0.76)", "3.00", "–"]]
        columns = [str(c.label) for c in screen.query_one("#stats-annotators", DataTable).columns.values()]
        assert columns == ["annotator", "decisions", "a picks", "b picks", "a share", "median decision s",
                           "self consistency"]
        assert "position bias: alice (0.82, 95% 0.52–0.95)" in texts(screen)
        # kappa: they agree on pairs 0 and 5-9 (p_o 0.6); p_e = 0.9·0.5 + 0.1·0.5 = 0.5; (0.6-0.5)/(1-0.5) = 0.2
        assert table_rows(screen, "stats-agreement") == [["alice · bob", "10", "0.20"]]

        await pilot.press("tab")  # the screens cycle on; coming back re-reads the store
        with Store(workspace.db_path) as store:
            first = store.comparisons()[0]
            store.add_comparison(first["prompt_id"], first["response_a_id"], first["response_b_id"], "b",
                                 annotator="carol", decision_ms=1000)
        await app.switch_mode("stats")
        await pilot.pause()
        assert [row[0] for row in table_rows(screen, "stats-annotators")] == ["alice", "bob", "carol"]
        assert any(text.startswith("pairs 10 · alpha ") for text in texts(screen))  # three annotators: alpha
