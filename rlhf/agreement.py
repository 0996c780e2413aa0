"""Annotator quality: position bias, decision time and agreement between annotators on the same pairs.

Pure functions over the labeled comparisons (`Store.labeled_decisions`); `rlhf-tui stats` prints their figures.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from itertools import combinations
from typing import Any, Hashable, Iterable

Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval
UNNAMED = "(unnamed)"  # decisions stored without an annotator name


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion p = k/n:
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). With no trials, (0, 1): nothing is known."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    denominator = 1 + z * z / trials
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


def cohens_kappa(first: list[Hashable], second: list[Hashable]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e), where p_o is the share
    of items they agree on and p_e = sum over categories of the product of each rater's share of that category.
    None when it is undefined (no items, or both raters used one and the same category: p_e = 1)."""
    if len(first) != len(second):
        raise ValueError("both raters must label the same items")
    n = len(first)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(first, second)) / n
    first_counts, second_counts = Counter(first), Counter(second)
    expected = sum(first_counts[c] * second_counts[c] for c in first_counts) / (n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def krippendorff_alpha_nominal(units: Iterable[list[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data, any number of raters, missing labels allowed:
    alpha = 1 - (n - 1) · sum_{c≠k} o_ck / sum_{c≠k} n_c·n_k, where the coincidence o_ck adds, for every unit
    with m ≥ 2 labels, each ordered pair of its labels (c, k) with weight 1/(m - 1); n_c = sum_k o_ck, n = sum n_c.
    Units with fewer than two labels are left out. None when undefined (no pairable labels or one category)."""
    coincidences: Counter[tuple[Hashable, Hashable]] = Counter()
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidences[labels[i], labels[j]] += 1 / (m - 1)
    totals: Counter[Hashable] = Counter()
    for (c, _), weight in coincidences.items():
        totals[c] += weight
    n = sum(totals.values())
    disagreement = sum(w for (c, k), w in coincidences.items() if c != k)
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if expected == 0:
        return None
    return 1 - (n - 1) * disagreement / expected


def preferred_side(response_a_id: int, response_b_id: int, choice: str) -> str | None:
    """A decision as the same label whichever side each answer was shown on: "first" or "second" (the answer
    with the lower or higher response id was preferred), "tie" and "both_bad" as their own categories; None
    for a skip, which judges nothing."""
    if choice in ("tie", "both_bad"):
        return choice
    if choice not in ("a", "b"):
        return None
    preferred = response_a_id if choice == "a" else response_b_id
    return "first" if preferred == min(response_a_id, response_b_id) else "second"


def annotator_report(decisions: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-annotator figures and pairwise agreement from labeled decisions (rows with annotator, prompt_id,
    response_a_id, response_b_id, choice, decision_ms, oldest first). An annotator who labeled a pair more
    than once counts with their latest decision for agreement."""
    by_annotator: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in decisions:
        by_annotator[row["annotator"] or UNNAMED].append(row)
    annotators = [_annotator_figures(name, rows) for name, rows in sorted(by_annotator.items())]

    labels: dict[tuple[int, int, int], dict[str, str]] = defaultdict(dict)  # pair -> annotator -> label
    for row in decisions:
        label = preferred_side(row["response_a_id"], row["response_b_id"], row["choice"])
        if label is not None:
            pair = (row["prompt_id"], *sorted((row["response_a_id"], row["response_b_id"])))
            labels[pair][row["annotator"] or UNNAMED] = label
    agreement = []
    for first, second in combinations(sorted(by_annotator), 2):
        shared = [by_name for by_name in labels.values() if first in by_name and second in by_name]
        agreement.append({
            "annotators": [first, second], "shared_pairs": len(shared),
            "cohens_kappa": cohens_kappa([s[first] for s in shared], [s[second] for s in shared]),
        })
    report: dict[str, Any] = {"annotators": annotators, "agreement": agreement}
    if len(by_annotator) > 2:
        multiply_labeled = [list(by_name.values()) for by_name in labels.values() if len(by_name) >= 2]
        report["krippendorff_alpha"] = {"pairs": len(multiply_labeled),
                                        "alpha": krippendorff_alpha_nominal(multiply_labeled)}
    return report


def _annotator_figures(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    a_picks = sum(row["choice"] == "a" for row in rows)
    b_picks = sum(row["choice"] == "b" for row in rows)
    times = [row["decision_ms"] / 1000 for row in rows if row["decision_ms"] is not None]
    return {
        "annotator": name, "decisions": len(rows), "a_picks": a_picks, "b_picks": b_picks,
        "a_share": a_picks / (a_picks + b_picks) if a_picks + b_picks else None,
        "a_share_wilson_95": list(wilson_interval(a_picks, a_picks + b_picks)),
        "median_decision_s": statistics.median(times) if times else None,
    }
