"""Each algorithm and KL controller on one seeded task: does the score rise while the KL holds its target?

    python benchmarks/bench_learning.py [--steps 40] [--target 2] [--lr 1e-3] [--runs ppo:log ppo:classic ...]

The seeded tiny task of tests/test_ppo.py: the tiny Llama pre-trained on the tiny corpus, a reward model
trained on 128 comparisons decided by a hidden rule (answers ending with "!" win), then one run per
ALGORITHM:CONTROLLER from the same seed, settings and reward model (16 responses a step: 16 prompts for PPO,
4 prompts x 4 samples for RLOO and GRPO; 2 minibatches, 4 epochs, 32 new tokens, init beta 0.05), an eager
learning rate. Each run is its own process, so its peak memory (VmHWM: model load + run) is its own. Prints
each run's KL (k1, nats per response), beta and score per step, then a table: score rise at the last step
(mean of the last 3 steps minus the first 3), mean KL of the last 10 steps as a multiple of the target (goal:
within [0.5, 1.5]), max KL, beta at the end, seconds per step, peak RSS. No assertions: tests/test_kl.py
asserts the band.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ (tiny models) is not installed; it sits beside benchmarks/

from rlhf.config import Workspace  # noqa: E402
from rlhf.store import Store  # noqa: E402

SETTINGS = {"ppo.batch_size": 16, "ppo.minibatches": 2, "ppo.ppo_epochs": 4, "ppo.max_new_tokens": 32,
            "ppo.init_kl_coef": 0.05, "ppo.checkpoint_every": 1000}


def prepare(root: Path) -> tuple[Workspace, str]:
    """The hidden-rule workspace on the pre-trained tiny Llama, with a finished reward run."""
    from rlhf.reward import train_reward
    from tools.tiny import exclamation_rule_workspace, pretrain_tiny_llama

    ws = exclamation_rule_workspace(root / "ws", pretrain_tiny_llama(root / "model"))
    reward = train_reward(ws, ws.load_config())
    assert reward.status == "finished", reward.message
    return ws, reward.run_id


def run(ws: Workspace, reward_run: str, name: str, steps: int, target: float, lr: float) -> dict[str, float]:
    """One run of `name` (ALGORITHM:CONTROLLER); its per-step rows printed, its summary returned."""
    from rlhf.ppo import run_ppo

    algorithm, controller = name.split(":")
    batch = {} if algorithm == "ppo" else {"ppo.batch_size": SETTINGS["ppo.batch_size"] // 4,
                                           "ppo.samples_per_prompt": 4}
    cfg = ws.load_config().override({**SETTINGS, **batch, "ppo.steps": steps, "ppo.lr": lr, "ppo.target_kl": target,
                                     "ppo.algorithm": algorithm, "ppo.kl_controller": controller})
    started = time.perf_counter()
    result = run_ppo(ws, cfg, reward_run=reward_run)
    seconds = time.perf_counter() - started
    assert result.status == "finished", result.message
    with Store(ws.db_path) as store:
        rows = [row for _, row in sorted(store.metrics_by_step(result.run_id).items())]
    print(f"\n{name}: step  kl_k1  beta   score  epochs_done")
    for step, row in enumerate(rows, 1):
        print(f"{name}: {step:4d} {row['kl_k1']:6.2f} {row['kl_coef']:6.3f} {row['score_mean']:6.2f}"
              f"  {row.get('epochs_done', float('nan')):.2f}")
    kls, scores = [row["kl_k1"] for row in rows], [row["score_mean"] for row in rows]
    return {"score_rise": sum(scores[-3:]) / 3 - sum(scores[:3]) / 3,
            "kl_last10": sum(kls[-10:]) / len(kls[-10:]), "kl_max": max(kls), "beta_end": rows[-1]["kl_coef"],
            "s_per_step": seconds / steps, "peak_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_in_child(*args: object) -> dict[str, float]:
    """`run(*args)` in a fresh process (spawned: no memory of the parent or of earlier runs)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--target", type=float, default=2.0, help="target KL, nats per response")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--runs", nargs="+", default=["ppo:log", "ppo:classic", "rloo:log", "grpo:log"],
                        metavar="ALGORITHM:CONTROLLER")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        ws, reward_run = prepare(Path(tmp))
        summaries = {name: run_in_child(ws, reward_run, name, args.steps, args.target, args.lr) for name in args.runs}
    print(f"\n{args.steps} steps, lr {args.lr}, target KL {args.target} nats")
    print("| run | score rise | KL last 10 (x target) | max KL | beta at end | s/step | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in summaries.items():
        print(f"| {name} | {s['score_rise']:.2f} | {s['kl_last10']:.2f} ({s['kl_last10'] / args.target:.2f}x) | "
              f"{s['kl_max']:.2f} | {s['beta_end']:.4f} | {s['s_per_step']:.2f} | {s['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
