"""Active pair selection: labels needed to reach a held-out accuracy of 0.9, with and without it.

The task is the demo's: the shipped demo model answers the demo prompts, and a scripted annotator prefers
the polite answer (`--rule polite`: a when only A is polite, b when only B is, skip when both or neither
are: a skip costs the person a look too, so it counts as a label) or the shorter one (`--rule brief`).
A pool of pairs (one per prompt, sampled once) stands for what the engine would sample; a held-out set of
decided pairs on other prompts measures the reward model.

Measured (docs/label_quality.md has the table): `--seeds 5 --retrain 4`, polite: random 17.6, uncertain
12.8 labels on average (381 s on the shared 2-core box).

Each seed and mode labels from the pool one pair at a time and trains a reward model (`train_reward`, the
demo's settings) after every `--retrain` labels, as a person retraining now and then would:

- random: the next pair of a seeded shuffle (what `[label] selection = "random"` serves);
- uncertain: once a reward model exists, `--candidates` pairs drawn from the rest of the pool and the one
  the newest reward model is least sure about (`rlhf.active.least_sure`, as the engine serves it).

Reported per mode: labels (decisions, skips included) until held-out accuracy first reaches 0.9, per seed
and the mean; a run that never reaches it within `--max-labels` counts as `--max-labels` and is marked.

    python benchmarks/bench_active.py [--rule polite|brief] [--seeds 3] [--pool 120] [--heldout 40] [--retrain 6]
                                      [--candidates 4]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ (the demo's style features) is not installed; it sits beside benchmarks/

TARGET_ACCURACY = 0.9


def polite_choice(text_a: str, text_b: str) -> str:
    """The demo's annotator: the polite answer wins; when both or neither are polite, skip."""
    from tools.demo import answer_style_features

    a, b = (answer_style_features(text)["is_polite"] for text in (text_a, text_b))
    return "a" if a and not b else "b" if b and not a else "skip"


def brief_choice(text_a: str, text_b: str) -> str:
    """An annotator who prefers the shorter answer (in words); skip when both are as long."""
    a, b = (len(text.split()) for text in (text_a, text_b))
    return "a" if a < b else "b" if b < a else "skip"


RULES = {"polite": polite_choice, "brief": brief_choice}


def sample_pairs(prompts: list[dict], model_dir: str, cfg, choose) -> list[dict]:
    """One pair per prompt from the demo model, with the annotator's choice."""
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.sampling import PairSampler

    sampler = PairSampler(load_causal_lm(model_dir).eval(), load_tokenizer(model_dir, padding_side="left"),
                          cfg.sampling, cfg.model.max_prompt_tokens)
    pairs = []
    for prompt in prompts:
        answers = sampler.sample(prompt["text"], None, prompt_id=prompt["id"], draw=0).answers
        pairs.append({"prompt": prompt["text"], "a": answers[0].text, "b": answers[1].text,
                      "choice": choose(answers[0].text, answers[1].text)})
    return pairs


def train_on(labeled: list[dict], cfg, root: Path):
    """A reward model trained on the labeled pairs (skips stored, as the app stores them); its scorer."""
    from rlhf.config import Workspace
    from rlhf.reward import train_reward
    from rlhf.reward_model import RewardScorer
    from rlhf.store import PromptItem, Store

    ws = Workspace(Path(tempfile.mkdtemp(dir=root)))
    with Store(ws.db_path) as store:
        for pair in labeled:
            (prompt_id,), _ = store.add_prompts([PromptItem(pair["prompt"])], source="bench")
            ids = [store.add_response(prompt_id, pair[side], model="demo") for side in ("a", "b")]
            store.add_comparison(prompt_id, *ids, pair["choice"])
        result = train_reward(ws, cfg, store=store)
    if result.status != "finished":
        return None
    return RewardScorer.from_run(ws, result.run_id)


def margins(scorer, pairs: list[dict]) -> list[float]:
    """Score of A minus score of B, per pair."""
    scores = scorer.score_many([(p["prompt"], p[side]) for p in pairs for side in ("a", "b")])
    return [scores[2 * i] - scores[2 * i + 1] for i in range(len(pairs))]


def accuracy(scorer, heldout: list[dict]) -> float:
    return sum((m > 0) == (p["choice"] == "a") for m, p in zip(margins(scorer, heldout), heldout)) / len(heldout)


def labels_to_target(pool: list[dict], heldout: list[dict], cfg, args, seed: int, mode: str,
                     root: Path) -> tuple[int, bool, list[tuple[int, float]]]:
    """Label until held-out accuracy reaches the target; (labels, reached, [(labels, accuracy)] per retrain)."""
    from rlhf.active import least_sure

    rng = random.Random(seed)
    unlabeled = list(range(len(pool)))
    rng.shuffle(unlabeled)
    labeled: list[dict] = []
    scorer, curve = None, []
    while len(labeled) < args.max_labels and unlabeled:
        if mode == "uncertain" and scorer is not None:
            candidates = rng.sample(unlabeled, min(args.candidates, len(unlabeled)))
            chosen = candidates[least_sure([[m] for m in margins(scorer, [pool[i] for i in candidates])])]
        else:
            chosen = unlabeled[0]
        unlabeled.remove(chosen)
        labeled.append(pool[chosen])
        if len(labeled) % args.retrain == 0 and sum(p["choice"] != "skip" for p in labeled) >= 2:
            scorer = train_on(labeled, cfg, root) or scorer
            if scorer is not None:
                curve.append((len(labeled), accuracy(scorer, heldout)))
                if curve[-1][1] >= TARGET_ACCURACY:
                    return len(labeled), True, curve
    return args.max_labels, False, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rule", choices=sorted(RULES), default="polite", help="the scripted annotator's taste")
    parser.add_argument("--pool", type=int, default=120, help="pairs to label from (one per prompt)")
    parser.add_argument("--heldout", type=int, default=40, help="decided pairs on other prompts to measure on")
    parser.add_argument("--retrain", type=int, default=6, help="labels between reward model trainings")
    parser.add_argument("--candidates", type=int, default=4, help="uncertain: candidate pairs per label")
    parser.add_argument("--max-labels", type=int, default=72)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    torch.set_num_threads(args.threads)
    from rlhf.config import Config
    from rlhf.demo_mode import import_demo_prompts, with_demo_defaults
    from rlhf.models import resolve_model_name
    from rlhf.store import Store

    cfg = with_demo_defaults(Config(), chosen=set())
    # Every label trains: the held-out set below measures; the demo's epochs; any count of decided pairs.
    cfg = cfg.override({"reward.heldout_fraction": 0.0, "reward.min_pairs": 2})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with Store(root / "prompts.db") as store:
            import_demo_prompts(store)
            prompts = store.prompts()
        random.Random(1234).shuffle(prompts)
        pairs = sample_pairs(prompts[:args.pool + 3 * args.heldout], resolve_model_name(cfg), cfg, RULES[args.rule])
        pool = pairs[:args.pool]
        heldout = [p for p in pairs[args.pool:] if p["choice"] != "skip"][:args.heldout]
        sampled_s = time.perf_counter() - started
        skips = sum(p["choice"] == "skip" for p in pool)
        print(f"rule {args.rule}: pool {len(pool)} pairs ({skips} the annotator skips), held-out {len(heldout)} "
              f"decided pairs; sampled in {sampled_s:.0f} s", flush=True)
        results: dict[str, list[tuple[int, bool]]] = {"random": [], "uncertain": []}
        for seed in range(args.seeds):
            for mode in results:
                labels, reached, curve = labels_to_target(pool, heldout, cfg, args, seed, mode, root)
                results[mode].append((labels, reached))
                shown = ", ".join(f"{n}: {acc:.2f}" for n, acc in curve)
                print(f"seed {seed} {mode:9s}: {labels}{'' if reached else '+'} labels  (accuracy by labels: {shown})",
                      flush=True)
    for mode, runs in results.items():
        mean = sum(n for n, _ in runs) / len(runs)
        misses = sum(not reached for _, reached in runs)
        note = f" ({misses} of {len(runs)} seeds did not reach it: counted as {args.max_labels})" if misses else ""
        print(f"{mode:9s}: mean {mean:.1f} labels to held-out accuracy {TARGET_ACCURACY}{note}")
    print(f"total {time.perf_counter() - started:.0f} s (retrain every {args.retrain} labels, "
          f"{args.candidates} candidates per uncertain label, {args.seeds} seeds)")


if __name__ == "__main__":
    main()
