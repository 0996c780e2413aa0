"""Blind evaluation's statistics: outcomes of labeled evaluation pairs, win rate with ties, and its 95% interval.

Pure functions; `rlhf/evaluation.py` reports with them. A tie (`t`) and "both bad" (`x`) prefer neither system and
count as half a win, so a win rate of 0.5 means no difference; a skip judges nothing and is not counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from .agreement import wilson_interval

OUTCOMES = ("win", "tie", "loss")


def eval_outcome(choice: str, candidate_side: str) -> str | None:
    """A decision on a blind pair as the candidate system's outcome: "win" when its side (`candidate_side`, "a" or
    "b") was preferred, "loss" when the other side was, "tie" for a tie or both bad; None for a skip."""
    if choice in ("tie", "both_bad"):
        return "tie"
    if choice not in ("a", "b"):
        return None
    return "win" if choice == candidate_side else "loss"


def tally_outcomes(outcomes: Iterable[str | None]) -> dict[str, int]:
    """Counts of "win", "tie" and "loss" (None, a skip, is left out)."""
    counts = Counter(outcome for outcome in outcomes if outcome is not None)
    return {outcome: counts[outcome] for outcome in OUTCOMES}


def win_rate(wins: int, ties: int, losses: int) -> float | None:
    """Win rate with ties as half a win: (wins + ties/2) / (wins + ties + losses); None with no decisions."""
    decided = wins + ties + losses
    return (wins + ties / 2) / decided if decided else None


def win_rate_interval(wins: int, ties: int, losses: int) -> tuple[float, float]:
    """95% Wilson score interval of `win_rate`: the Wilson interval of wins + ties/2 successes in wins + ties +
    losses trials; (0, 1) with no decisions."""
    return wilson_interval(wins + ties / 2, wins + ties + losses)  # type: ignore[arg-type] - a half success is fine
