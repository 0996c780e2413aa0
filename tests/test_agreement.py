"""Annotator quality: Wilson interval, Cohen's kappa, Krippendorff's alpha against hand-computed numbers, and
the per-annotator lines `rlhf-tui stats` prints for a workspace labeled by several annotators."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf import cli
from rlhf.agreement import (agreement_falls, annotator_report, cohens_kappa, krippendorff_alpha_nominal,
                            length_score_correlation, pearson, preferred_side, reward_agreement, reward_margin,
                            self_consistency, wilson_interval)
from rlhf.store import PromptItem, Store
from rlhf_tui.app.widgets.agreement import agreement_lines


def test_wilson_interval_by_hand():
    # 7 of 10, z = 1.96: centre 0.7 + z²/20 = 0.89207, spread z·sqrt(0.021 + z²/400) = 0.34288, over 1 + z²/10.
    low, high = wilson_interval(7, 10)
    assert (low, high) == (pytest.approx(0.39677, abs=1e-5), pytest.approx(0.89221, abs=1e-5))
    # Symmetric around 0.5 for an even split; all picks on one side still leaves the far end open.
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high)
    assert wilson_interval(3, 3)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_cohens_kappa_on_a_two_by_two_table():
    # Agree on 4 "first" and 3 "second"; 2 first/second and 1 second/first. p_o = 0.7;
    # rater 1: 6 first, 4 second; rater 2: 5 and 5; p_e = (6·5 + 4·5) / 100 = 0.5; kappa = 0.2 / 0.5 = 0.4.
    first = ["first"] * 4 + ["second"] * 3 + ["first"] * 2 + ["second"]
    second = ["first"] * 4 + ["second"] * 3 + ["second"] * 2 + ["first"]
    assert cohens_kappa(first, second) == pytest.approx(0.4)
    assert cohens_kappa(first, first) == pytest.approx(1.0)
    assert cohens_kappa(["tie", "tie"], ["tie", "tie"]) is None  # p_e = 1: undefined
    assert cohens_kappa([], []) is None
    with pytest.raises(ValueError):
        cohens_kappa(["first"], [])


def test_krippendorff_alpha_nominal_by_hand():
    # Units [x,x] [x,y] [y,y] [x,x,y] (the last weighted 1/2): o_xx = 2 + 1, o_yy = 2, o_xy = o_yx = 1 + 1;
    # n_x = 5, n_y = 4, n = 9; alpha = 1 - 8 · 4 / (2 · 5 · 4) = 0.2.
    assert krippendorff_alpha_nominal([["x", "x"], ["x", "y"], ["y", "y"], ["x", "x", "y"]]) == pytest.approx(0.2)
    # The kappa table above as alpha: o_ff = 8, o_ss = 6, o_fs = o_sf = 3; n_f = 11, n_s = 9;
    # alpha = 1 - 19 · 6 / (2 · 11 · 9) = 1 - 114 / 198.
    table = [["first", "first"]] * 4 + [["second", "second"]] * 3 + [["first", "second"]] * 2 + \
        [["second", "first"]]
    assert krippendorff_alpha_nominal(table) == pytest.approx(1 - 114 / 198)
    assert krippendorff_alpha_nominal([["x"], ["y", "y"], ["y", "y"]]) is None  # one category: undefined


def test_preferred_side_ignores_which_side_each_answer_was_shown_on():
    assert preferred_side(3, 7, "a") == preferred_side(7, 3, "b") == "first"
    assert preferred_side(3, 7, "b") == preferred_side(7, 3, "a") == "second"
    assert preferred_side(7, 3, "tie") == "tie" and preferred_side(3, 7, "both_bad") == "both_bad"
    assert preferred_side(3, 7, "skip") is None


def test_report_uses_each_annotators_latest_decision_on_a_pair():
    rows = [{"annotator": name, "prompt_id": 1, "response_a_id": a, "response_b_id": b, "choice": choice,
             "decision_ms": None} for name, a, b, choice in
            [("ann", 1, 2, "b"), ("ann", 2, 1, "b"), ("bo", 1, 2, "a"), (None, 1, 2, "a")]]
    report = annotator_report(rows)
    assert [a["annotator"] for a in report["annotators"]] == ["(unnamed)", "ann", "bo"]
    ann_bo = next(p for p in report["agreement"] if p["annotators"] == ["ann", "bo"])
    assert ann_bo["shared_pairs"] == 1  # ann changed their mind to "first", bo also said "first"
    assert report["krippendorff_alpha"] == {"pairs": 1, "alpha": None}  # everyone agrees on one category


# -- rlhf-tui stats ----------------------------------------------------------------------------


def _label(store: Store, annotator: str, pair: tuple[int, int, int], shown_first: bool, choice: str,
           decision_ms: int | None) -> None:
    prompt_id, lower, higher = pair
    a, b = (lower, higher) if shown_first else (higher, lower)
    store.add_comparison(prompt_id, a, b, choice, annotator=annotator, decision_ms=decision_ms)


def test_stats_prints_position_bias_time_and_agreement_per_annotator(capsys, tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    with Store(ws / "rlhf.db") as store:
        prompt_ids, _ = store.add_prompts([PromptItem(f"q{i}") for i in range(5)], source="test")
        pairs = [(p, store.add_response(p, "one", model="m"), store.add_response(p, "two", model="m"))
                 for p in prompt_ids]
        # Preferred answer (f = lower id, s = higher id): alice f s f tie, bob f s s tie -> kappa:
        # p_o = 3/4, p_e = (2·1 + 1·2 + 1·1) / 16 = 5/16, kappa = (12/16 - 5/16) / (11/16) = 7/11 = 0.64.
        for pair, shown_first, choice, ms in [(pairs[0], True, "a", 1000), (pairs[1], True, "b", 2000),
                                              (pairs[2], False, "b", 3000), (pairs[3], True, "tie", 4000),
                                              (pairs[4], True, "skip", 500)]:
            _label(store, "alice", pair, shown_first, choice, ms)
        for pair, shown_first, choice, ms in [(pairs[0], False, "b", 1500), (pairs[1], False, "a", 2500),
                                              (pairs[2], False, "a", None), (pairs[3], False, "tie", 3500)]:
            _label(store, "bob", pair, shown_first, choice, ms)
        _label(store, "carol", pairs[4], True, "a", None)
        # An imported pair always has the chosen answer on side A: not an annotator's decision.
        store.add_comparison(prompt_ids[0], pairs[0][1], pairs[0][2], "a", source="import:pairs.jsonl")

    code = cli.main(["stats", "--workspace", str(ws)])
    out = capsys.readouterr().out
    assert code == 0
    # Today's lines first, unchanged; then alice 1 a of 3 a/b picks, bob 2 of 3, carol 1 of 1 (Wilson bounds
    # by the formula: 1/3 -> 0.0615-0.7923, 1/1 -> 0.2065-1). Alpha on the 4 shared pairs: n_f = 3, n_s = 3,
    # n_tie = 2, n = 8, one disagreement (o_fs = o_sf = 1): 1 - 7 · 2 / (64 - 9 - 9 - 4) = 2/3.
    assert out.splitlines()[2:] == [
        "comparisons: 11 (a 5, b 3, tie 2, both_bad 0, skip 1)",
        "runs: none",
        "annotator alice: 5 decisions, A share 0.33 (95% Wilson 0.06-0.79, 3 a/b picks), median 2.0 s per decision",
        "annotator bob: 4 decisions, A share 0.67 (95% Wilson 0.21-0.94, 3 a/b picks), median 2.5 s per decision",
        "annotator carol: 1 decision, A share 1.00 (95% Wilson 0.21-1.00, 1 a/b pick), no decision times",
        "agreement alice ~ bob: Cohen's kappa 0.64 on 4 shared pairs",
        "agreement alice ~ carol: no shared pairs",  # alice skipped the pair carol labeled
        "agreement bob ~ carol: no shared pairs",
        "agreement, all 3 annotators: Krippendorff's alpha (nominal) 0.67 on 4 pairs labeled by two or more",
    ]

    assert cli.main(["stats", "--json", "--workspace", str(ws)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["comparisons"] == 11
    alice = stats["annotators"][0]
    assert (alice["annotator"], alice["a_picks"], alice["b_picks"], alice["median_decision_s"]) == ("alice", 1, 2, 2.0)
    assert stats["agreement"][0] == {"annotators": ["alice", "bob"], "shared_pairs": 4,
                                     "cohens_kappa": pytest.approx(7 / 11)}
    assert stats["krippendorff_alpha"]["alpha"] == pytest.approx(2 / 3)


def test_stats_with_one_annotator_says_there_are_no_shared_pairs(capsys, tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    with Store(ws / "rlhf.db") as store:
        (prompt_id,), _ = store.add_prompts([PromptItem("q")], source="test")
        pair = (prompt_id, *(store.add_response(prompt_id, text, model="m") for text in ("one", "two")))
        _label(store, "alice", pair, True, "skip", 800)
    assert cli.main(["stats", "--workspace", str(ws)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "annotator alice: 1 decision, A share n/a (no a/b picks), median 0.8 s per decision",
        "agreement: no shared pairs (one annotator)",
    ]


# -- reward model vs the person, length vs score, repeated pairs -------------------------------------------


def test_reward_margin_is_the_preferred_answers_score_minus_the_others():
    assert reward_margin(1.5, -0.5, "a") == 2.0  # agrees
    assert reward_margin(1.5, -0.5, "b") == -2.0  # the person preferred the answer it scored lower
    assert [reward_margin(1.0, 0.0, c) for c in ("tie", "both_bad", "skip")] == [None, None, None]


def test_reward_agreement_counts_positive_margins_with_a_wilson_interval():
    # 2 of 4 margins above 0 (a zero margin is no agreement): Wilson(2, 4) = 0.150-0.850 by the formula.
    figures = reward_agreement([2.0, -1.0, 0.5, 0.0])
    assert (figures["agree"], figures["n"], figures["share"]) == (2, 4, 0.5)
    assert figures["wilson_95"] == [pytest.approx(0.15004, abs=1e-4), pytest.approx(0.84996, abs=1e-4)]
    assert reward_agreement([]) == {"agree": 0, "n": 0, "share": None, "wilson_95": [0.0, 1.0]}


def test_agreement_falls_below_the_floor_or_significantly_below_heldout_accuracy():
    assert agreement_falls(2, 9, 0.9) is None  # under 10 labels: too few to say
    assert "only 50% of the last 10 labels" in agreement_falls(5, 10, None)  # below the 0.6 floor
    # 8 of 10: Wilson upper bound (0.8 + 0.19207 + 0.31363) / 1.38415 = 0.9433.
    assert "below its held-out accuracy 95%" in agreement_falls(8, 10, 0.95)
    assert agreement_falls(8, 10, 0.94) is None  # 0.94 lies inside the interval: not significantly below
    assert agreement_falls(8, 10, None) is None


def test_pearson_by_hand():
    # x 1 2 3, y 2 4 7: cov 5, var_x 2, var_y 38/3 -> r = 5 / sqrt(76/3) = 0.99340.
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(76 / 3))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None
    with pytest.raises(ValueError):
        pearson([1, 2], [1])


def test_length_score_correlation_uses_characters_and_skips_unscored_samples():
    samples = [{"response": "ab", "score": 0.0}, {"response": "abcd", "score": 1.0},
               {"response": "abcdef", "score": 3.0}, {"response": "abcdefgh", "score": None}]
    # lengths 2 4 6, scores 0 1 3: cov 6, var_x 8, var_y 14/3 -> r = 6 / sqrt(112/3) = 0.98198.
    assert length_score_correlation(samples) == {"samples": 3, "pearson": pytest.approx(6 / math.sqrt(112 / 3))}


def test_self_consistency_leaves_skips_out():
    figures = self_consistency([("first", "first"), ("first", "second"), ("tie", "tie"), (None, "first")])
    assert (figures["agree"], figures["n"]) == (2, 3)
    assert figures["wilson_95"] == list(wilson_interval(2, 3))


def test_report_counts_an_annotators_repeats_of_their_own_decisions():
    def row(id_, name, a, b, choice, repeat_of=None):
        return {"id": id_, "annotator": name, "prompt_id": 1, "response_a_id": a, "response_b_id": b,
                "choice": choice, "decision_ms": None, "repeat_of": repeat_of}
    rows = [row(1, "ann", 1, 2, "a"), row(2, "ann", 3, 4, "tie"), row(3, "bo", 5, 6, "b"),
            row(4, "ann", 2, 1, "b", repeat_of=1),  # sides swapped, same answer preferred: consistent
            row(5, "ann", 4, 3, "a", repeat_of=2),  # was a tie: inconsistent
            row(6, "ann", 6, 5, "a", repeat_of=3)]  # bo's decision: not ann's self-consistency
    ann, bo = annotator_report(rows)["annotators"]
    assert (ann["self_consistency"]["agree"], ann["self_consistency"]["n"]) == (1, 2)
    assert bo["self_consistency"]["n"] == 0


def test_store_keeps_the_reward_models_margin_and_repeat_links(tmp_path: Path):
    with Store(tmp_path / "rlhf.db") as store:
        (prompt_id,), _ = store.add_prompts([PromptItem("q")], source="test")
        first, second = (store.add_response(prompt_id, text, model="m") for text in ("one", "two"))
        reward_run = store.create_run("reward", {})
        store.add_response_scores(reward_run, {first: 0.25, second: 1.0})
        original = store.add_comparison(prompt_id, first, second, "a")
        unscored = store.add_comparison(prompt_id, first, store.add_response(prompt_id, "three", model="m"), "a")
        assert store.repeat_candidate(seed=0)["id"] in (original, unscored)
        repeat = store.add_comparison(prompt_id, second, first, "b", repeat_of=original)
        assert [(r["id"], r["reward_run"], r["reward_margin"]) for r in store.reward_margins(10)] == \
            [(repeat, reward_run, -0.75), (original, reward_run, -0.75)]  # it preferred "two"; the person "one"
        assert store.reward_margins(10, reward_run="other") == []
        assert [d["repeat_of"] for d in store.labeled_decisions()] == [None, None, original]
        assert [p["comparison_id"] for p in store.preference_pairs()] == [original, unscored]  # repeat left out
        assert store.repeat_candidate(seed=0)["id"] == unscored  # the original is repeated already
        store.delete_comparison(original)  # undone: the repeat stays, as a decision of its own
        assert store.labeled_decisions()[-1]["repeat_of"] is None


def test_stats_prints_the_reward_models_agreement_length_correlation_and_self_consistency(capsys, tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    with Store(ws / "rlhf.db") as store:
        reward_run = store.create_run("reward", {})
        store.log_metrics(reward_run, 3, {"heldout_acc": 0.9})
        prompt_ids, _ = store.add_prompts([PromptItem(f"q{i}") for i in range(4)], source="test")
        first_comparison = None
        for prompt_id, (score_a, score_b, choice) in zip(prompt_ids, [(1.0, 0.0, "a"), (0.0, 2.0, "b"),
                                                                      (0.5, 0.25, "a"), (1.0, 0.0, "b")]):
            a, b = (store.add_response(prompt_id, text, model="m") for text in ("one", "two"))
            store.add_response_scores(reward_run, {a: score_a, b: score_b})
            comparison = store.add_comparison(prompt_id, a, b, choice, annotator="alice")
            first_comparison = first_comparison or (comparison, prompt_id, a, b)
        comparison, prompt_id, a, b = first_comparison
        store.add_comparison(prompt_id, b, a, "b", annotator="alice", repeat_of=comparison)  # sides swapped: same
        ppo_run = store.create_run("ppo", {})
        store.add_samples(ppo_run, 1, [{"prompt": "q", "response": text, "score": score}
                                       for text, score in [("ab", 0.0), ("abcd", 1.0), ("abcdef", 3.0)]])

    assert cli.main(["stats", "--workspace", str(ws)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Margins +1, +2, +0.25, -1 (the repeat's answers were scored too: +1): 4 of 5 agree, Wilson(4, 5) = 0.38-0.96;
    # fewer than 10 labels, so no alarm. Pearson of lengths 2 4 6 and scores 0 1 3 = 6 / sqrt(112/3) = 0.98.
    assert lines[-4:] == [
        "annotator alice self-consistency: same answer preferred on 1 of 1 repeated pair (1.00, 95% Wilson 0.21-1.00)",
        "agreement: no shared pairs (one annotator)",
        f"reward model vs labels: agrees on 4 of 5 labels (0.80, 95% Wilson 0.38-0.96), newest 5 judged "
        f"(reward run {reward_run}, held-out accuracy 0.90)",
        f"length vs score ({ppo_run}): Pearson 0.98 over 3 samples",
    ]
    assert cli.main(["stats", "--json", "--workspace", str(ws)]) == 0
    check = json.loads(capsys.readouterr().out)["reward_model"]
    assert (check["agree"], check["n"], check["reward_run"], check["warning"]) == (4, 5, reward_run, None)
    assert check["length_score"] == {"ppo_run": ppo_run, "samples": 3, "pearson": pytest.approx(6 / math.sqrt(112 / 3))}


# -- the agreement pane (Train screen) -----------------------------------------------------------------


def judged_workspace(root: Path, margins: list[float]) -> tuple[Path, str]:
    """A workspace whose reward run (held-out accuracy 0.9) judged one label per margin (score a - b, choice a)."""
    root.mkdir()
    with Store(root / "rlhf.db") as store:
        reward_run = store.create_run("reward", {})
        store.log_metrics(reward_run, 1, {"heldout_acc": 0.9})
        prompt_ids, _ = store.add_prompts([PromptItem(f"q{i}") for i in range(len(margins))], source="test")
        for prompt_id, margin in zip(prompt_ids, margins):
            a, b = (store.add_response(prompt_id, text, model="m") for text in ("one", "two"))
            store.add_response_scores(reward_run, {a: margin, b: 0.0})
            store.add_comparison(prompt_id, a, b, "a")
    return root, reward_run


def test_agreement_lines_by_hand():
    check = {"n": 12, "agree": 3, "share": 0.25, "wilson_95": list(wilson_interval(3, 12)), "heldout_accuracy": 0.9,
             "warning": agreement_falls(3, 12, 0.9), "length_score": {"samples": 3, "pearson": 0.5}}
    # Wilson(3, 12) = 0.089-0.532 by the formula.
    assert agreement_lines(check) == [
        "reward model vs you: agrees on 3/12 newest labels (25%, 95% 9%-53%), held-out 90% · length~score r +0.50 "
        "(3 samples)",
        "⚠ reward model agrees with you on only 25% of the last 12 labels: the policy may be exploiting it; label "
        "more, then refit"]
    none = {**check, "n": 0, "warning": None, "length_score": {"samples": 0, "pearson": None}}
    assert agreement_lines(none) == ["reward model vs you: no labels it judged yet (pairs served after a reward "
                                     "run are)"]


async def test_agreement_pane_follows_the_store_and_warns_when_agreement_falls(tmp_path: Path):
    from textual.app import App, ComposeResult

    from rlhf_tui.app.widgets.agreement import AgreementPane

    ws, reward_run = judged_workspace(tmp_path / "ws", [1.0] * 10)
    with Store(ws / "rlhf.db") as store:

        class PaneApp(App):
            def compose(self) -> ComposeResult:
                yield AgreementPane(store, window=10)

        app = PaneApp()
        async with app.run_test(size=(120, 10)) as pilot:
            pane = app.query_one(AgreementPane)
            assert "agrees on 10/10 newest labels (100%" in str(pane.render()) and not pane.has_class("falling")
            prompt_ids, _ = store.add_prompts([PromptItem(f"late {i}") for i in range(8)], source="test")
            for prompt_id in prompt_ids:  # the policy moved: the reward model now prefers the answers you reject
                a, b = (store.add_response(prompt_id, text, model="m") for text in ("one", "two"))
                store.add_response_scores(reward_run, {a: -1.0, b: 0.0})
                store.add_comparison(prompt_id, a, b, "a")
            await pilot.pause(2.5)  # the pane reads the store again every 2 s
            assert "agrees on 2/10 newest labels (20%" in str(pane.render()) and pane.has_class("falling")
            assert "⚠ reward model agrees with you on only 20% of the last 10 labels" in str(pane.render())


async def test_train_screen_shows_the_agreement_pane(tmp_path: Path, tiny_model_dir: Path):
    from rlhf_tui.app.main import RlhfApp
    from rlhf_tui.app.screens.train import TrainScreen
    from textual.widgets import Footer

    from rlhf_tui.app.widgets.agreement import AgreementPane
    from rlhf.config import Workspace

    ws, _ = judged_workspace(tmp_path / "ws", [1.0, -1.0, 1.0, 1.0])
    (ws / "rlhf.toml").write_text(f'[model]\nname = "{tiny_model_dir.as_posix()}"\n', encoding="utf-8")
    workspace = Workspace(ws)
    app = RlhfApp(workspace, workspace.load_config())
    async with app.run_test(size=(120, 30)) as pilot:
        train = await app.show_screen("train", TrainScreen)
        await pilot.pause()
        pane, footer = train.query_one(AgreementPane), train.query_one(Footer)
        assert pane.region.height >= 1 and pane.region.bottom <= footer.region.y  # on screen, above the footer
        assert "agrees on 3/4 newest labels (75%" in str(pane.render())


async def test_the_length_correlation_is_of_the_ppo_run_on_screen(tmp_path: Path, tiny_model_dir: Path):
    """Two PPO runs: the older one's samples buy score with length, the newer one's do not. A run opened from the
    Runs screen shows its own correlation; the Train screen's pane follows the run it shows (the latest while it
    shows none)."""
    from rlhf_tui.app.main import RlhfApp
    from rlhf_tui.app.screens.runs import RunScreen
    from rlhf_tui.app.screens.train import TrainScreen
    from rlhf_tui.app.widgets.agreement import AgreementPane

    from rlhf.config import Workspace

    ws, _ = judged_workspace(tmp_path / "ws", [1.0, 1.0])
    (ws / "rlhf.toml").write_text(f'[model]\nname = "{tiny_model_dir.as_posix()}"\n', encoding="utf-8")
    with Store(ws / "rlhf.db") as store:
        older, newer = store.create_run("ppo", {}), store.create_run("ppo", {})
        store.add_samples(older, 1, [{"prompt": "q", "response": "x" * n, "score": float(n)} for n in (1, 2, 4)])
        store.add_samples(newer, 1, [{"prompt": "q", "response": "x" * n, "score": float(-n)} for n in (1, 2, 4)])
    workspace = Workspace(ws)
    app = RlhfApp(workspace, workspace.load_config())
    async with app.run_test(size=(120, 30)) as pilot:
        train = await app.show_screen("train", TrainScreen)
        await pilot.pause()
        assert "length~score r -1.00 (3 samples)" in str(train.query_one(AgreementPane).render())  # the latest
        train.query_one(AgreementPane).follow(older)  # what the screen does once it shows a run
        assert "length~score r +1.00 (3 samples)" in str(train.query_one(AgreementPane).render())

        await app.push_screen(RunScreen(app.store.run(older)))
        await pilot.pause()
        assert "length~score r +1.00 (3 samples)" in str(app.screen.query_one(AgreementPane).render())
