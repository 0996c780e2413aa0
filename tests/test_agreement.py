"""Annotator quality: Wilson interval, Cohen's kappa, Krippendorff's alpha against hand-computed numbers, and
the per-annotator lines `rlhf-tui stats` prints for a workspace labeled by several annotators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf import cli
from rlhf.agreement import (annotator_report, cohens_kappa, krippendorff_alpha_nominal, preferred_side,
                            wilson_interval)
from rlhf.store import PromptItem, Store


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
