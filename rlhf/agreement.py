"""Annotator quality: position bias, decision time, self-consistency on repeated pairs and agreement between
annotators on the same pairs; the reward model's agreement with the person and the length-vs-score correlation.

Pure functions over the labeled comparisons (`Store.labeled_decisions`, `Store.reward_margins`) and a run's
samples; `rlhf-tui stats` prints their figures, the Train screen the reward model's.
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


def reward_margin(score_a: float, score_b: float, choice: str) -> float | None:
    """The reward model's margin on a person's decision: the score of the answer the person preferred minus the
    other's (> 0: the reward model agrees, < 0: it prefers the other answer). None for tie, both_bad and skip,
    where no answer was preferred."""
    if choice == "a":
        return score_a - score_b
    if choice == "b":
        return score_b - score_a
    return None


def share_with_interval(successes: int, trials: int) -> dict[str, Any]:
    """A share k/n with its 95% Wilson interval, as stats and the screens show it (share None when n = 0)."""
    return {"agree": successes, "n": trials, "share": successes / trials if trials else None,
            "wilson_95": list(wilson_interval(successes, trials))}


def reward_agreement(margins: Iterable[float]) -> dict[str, Any]:
    """How often the reward model agreed with the person (margin > 0; a margin of exactly 0 is no agreement),
    with the share's 95% Wilson interval."""
    margins = list(margins)
    return share_with_interval(sum(m > 0 for m in margins), len(margins))


def agreement_falls(agree: int, n: int, heldout_accuracy: float | None, *, floor: float = 0.6,
                    min_labels: int = 10) -> str | None:
    """The reward-hacking alarm: why the reward model's recent agreement with the person has fallen, or None.

    With at least `min_labels` labels, it has fallen when the share agreeing is below `floor` (0.6: little
    better than a coin), or when even the upper end of its 95% Wilson interval is below the reward model's
    held-out accuracy (it agrees with the person on fresh policy samples significantly less often than on
    the held-out pairs it was tested on: the policy found answers it scores wrongly)."""
    if n < min_labels:
        return None
    share = agree / n
    if share < floor:
        return f"reward model agrees with you on only {share:.0%} of the last {n} labels"
    upper = wilson_interval(agree, n)[1]
    if heldout_accuracy is not None and upper < heldout_accuracy:
        return (f"reward model agrees with you on {share:.0%} of the last {n} labels (95% up to {upper:.0%}), "
                f"below its held-out accuracy {heldout_accuracy:.0%}")
    return None


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation cov(x, y) / (sd(x)·sd(y)); None with fewer than two points or a constant series."""
    if len(xs) != len(ys):
        raise ValueError("both series must have the same length")
    n = len(xs)
    if n < 2:
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    if var_x == 0 or var_y == 0:
        return None
    return cov / math.sqrt(var_x * var_y)


def length_score_correlation(samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Pearson correlation between answer length (characters) and reward score over a run's samples (rows with
    response and score); a strong positive one while agreement falls says the policy is buying reward with
    length."""
    scored = [s for s in samples if s["score"] is not None]
    return {"samples": len(scored),
            "pearson": pearson([float(len(s["response"])) for s in scored], [s["score"] for s in scored])}


def self_consistency(pairs: Iterable[tuple[str | None, str | None]]) -> dict[str, Any]:
    """Of (original, repeat) labels of the same pair (each as `preferred_side` maps it), the share where the
    repeat says the same, with its 95% Wilson interval; a skip on either side judges nothing and is left out."""
    judged = [(first, second) for first, second in pairs if first is not None and second is not None]
    return share_with_interval(sum(first == second for first, second in judged), len(judged))


def annotator_report(decisions: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-annotator figures and pairwise agreement from labeled decisions (rows with annotator, prompt_id,
    response_a_id, response_b_id, choice, decision_ms, and optionally id and repeat_of, oldest first). An
    annotator who labeled a pair more than once counts with their latest decision for agreement; a repeated
    pair (repeat_of: the decision it repeats) counts for the annotator's self-consistency when the same
    annotator made both decisions."""
    by_annotator: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in decisions:
        by_annotator[row["annotator"] or UNNAMED].append(row)
    by_id = {row["id"]: row for row in decisions if row.get("id") is not None}
    annotators = [_annotator_figures(name, rows) | {"self_consistency": _self_consistency_of(rows, by_id)}
                  for name, rows in sorted(by_annotator.items())]

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


def _self_consistency_of(rows: list[dict[str, Any]], by_id: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """`self_consistency` over one annotator's repeats of their own decisions."""
    def label(row: dict[str, Any]) -> str | None:
        return preferred_side(row["response_a_id"], row["response_b_id"], row["choice"])

    originals = [(by_id.get(row.get("repeat_of")), row) for row in rows if row.get("repeat_of") is not None]
    return self_consistency((label(original), label(repeat)) for original, repeat in originals
                            if original is not None and original["annotator"] == repeat["annotator"])


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


RECENT_SAMPLES = 200  # a PPO run's newest samples the length-vs-score correlation is measured on


def reward_model_check(store: Any, window: int, ppo_run: str | None = None) -> dict[str, Any]:
    """The reward model against the person on the newest `window` labels it judged (`reward_agreement`, and
    the alarm of `agreement_falls` against that reward run's held-out accuracy), with the length-vs-score
    correlation over the newest samples of `ppo_run` (default: the latest PPO run). Reads a `rlhf.store.Store`."""
    judged = store.reward_margins(window)
    reward_run = judged[0]["reward_run"] if judged else None
    figures = reward_agreement(row["reward_margin"] for row in judged)
    accuracy = store.metrics(reward_run, "heldout_acc") if reward_run else []
    heldout = accuracy[-1]["value"] if accuracy else None
    if ppo_run is None:
        runs = store.runs("ppo")
        ppo_run = runs[-1].id if runs else None
    samples = store.samples(ppo_run, limit=RECENT_SAMPLES) if ppo_run else []
    return {"reward_run": reward_run, **figures, "heldout_accuracy": heldout,
            "warning": agreement_falls(figures["agree"], figures["n"], heldout),
            "length_score": {"ppo_run": ppo_run, **length_score_correlation(samples)}}


def workspace_report(store: Any, agreement_window: int) -> dict[str, Any]:
    """Everything `rlhf-tui stats` and the app's Stats screen show: the store's counts, the reward model against
    the person (`reward_model_check` on the newest `agreement_window` labels) and, when there are labeled
    decisions, `annotator_report`'s figures. Reads a `rlhf.store.Store`."""
    report = store.stats()
    report["reward_model"] = reward_model_check(store, agreement_window)
    decisions = store.labeled_decisions()
    if decisions:
        report.update(annotator_report(decisions))
    return report
