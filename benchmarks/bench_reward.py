"""Reward training: rlhf-tui's `train_reward` against trl's `RewardTrainer`, same pairs, same model.

Both train a LoRA (r, alpha, all linear layers) and a score head with the Bradley-Terry loss plus
centering, on the same hidden-rule pairs (tools.tiny.hidden_rule_pairs), tokenized once by rlhf-tui
and handed to trl pre-tokenized, so both see identical token ids and the identical split by prompt.
Reported: seconds per epoch and held-out pairwise accuracy.

trl is not a dependency of rlhf-tui. Install it in a separate venv that reuses this environment:

    python -m venv --system-site-packages .venv-bench
    .venv-bench/bin/pip install trl
    .venv-bench/bin/python benchmarks/bench_reward.py [--size tiny|35m] [--prompts 50] [--epochs 3]

Without trl the script measures rlhf-tui alone and says that trl was skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ (tiny models) is not installed; it sits beside benchmarks/

# These modules load no torch, so OMP_NUM_THREADS set in main() still takes effect.
from rlhf.hooks import RunHooks  # noqa: E402
from rlhf.store import Store  # noqa: E402
from tools.tiny import workspace_with_pairs  # noqa: E402

SIZES = {
    "tiny": {},
    # The generated corpus saturates the BPE near 500 tokens, so the size comes from the layers.
    "35m": {"vocab_size": 1024, "hidden_size": 512, "num_layers": 10, "num_heads": 8, "intermediate_size": 1536},
}


class EpochTimer(RunHooks):
    """Times epochs by the held-out evaluations train_reward reports before training and after each epoch
    (so our figure includes one held-out pass per epoch; trl's has none)."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[float] = []

    def on_step(self, run_id, step, metrics):
        if "heldout_acc" in metrics:
            self.marks.append(time.perf_counter())

    def seconds_per_epoch(self) -> float:
        return (self.marks[-1] - self.marks[0]) / (len(self.marks) - 1)


def ours(root: Path, model_dir: Path, pairs: list[dict], args: argparse.Namespace) -> dict:
    from rlhf.reward import train_reward
    from rlhf.reward_model import read_reward_meta

    ws = workspace_with_pairs(root / "ws", model_dir, pairs,
                              f"[reward]\nepochs = {args.epochs}\nlr = {args.lr}\nheldout_fraction = {args.heldout}\n"
                              f"lora_r = {args.lora_r}\nlora_alpha = {2 * args.lora_r}\n")
    timer = EpochTimer()
    result = train_reward(ws, ws.load_config(), hooks=timer)
    meta = read_reward_meta(Path(result.checkpoint))
    return {"workspace": ws, "config": ws.load_config(), "seconds_per_epoch": timer.seconds_per_epoch(),
            "heldout_acc": meta["heldout_acc"], "heldout_pairs": meta["counts"]["heldout"]}


def trl_reward_trainer(root: Path, model_dir: Path, mine: dict, args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    from rlhf.models import load_sequence_classifier, load_tokenizer
    from rlhf.reward_pairs import encode_pairs, is_heldout

    cfg = mine["config"]
    with Store(mine["workspace"].db_path) as store:
        pairs = store.preference_pairs()
    tokenizer = load_tokenizer(str(model_dir))
    encoded = encode_pairs(pairs, tokenizer, cfg.reward.max_length)
    held = [is_heldout(p.prompt_id, cfg.reward.seed, cfg.reward.heldout_fraction) for p in encoded]
    train = Dataset.from_list([{"chosen_ids": p.chosen, "rejected_ids": p.rejected}
                               for p, h in zip(encoded, held) if not h])
    heldout = [p for p, h in zip(encoded, held) if h]

    torch.manual_seed(cfg.reward.seed)
    model = load_sequence_classifier(str(model_dir), pad_token_id=tokenizer.pad_token_id)
    trl_args = RewardConfig(
        output_dir=str(root / "trl"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=cfg.reward.batch_size, center_rewards_coefficient=cfg.reward.center_coef,
        max_length=cfg.reward.max_length, gradient_checkpointing=False, use_cpu=True, bf16=False,
        report_to=[], save_strategy="no", logging_steps=10, seed=cfg.reward.seed, disable_tqdm=True)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=trl_args, train_dataset=train, processing_class=tokenizer,
                            peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started

    trained = trainer.model.eval()
    with torch.no_grad():  # one row at a time: no padding, so nothing depends on how trl's model finds the end
        def score(ids: list[int]) -> float:
            return trained(input_ids=torch.tensor([ids])).logits[0, 0].item()

        correct = sum(score(p.chosen) > score(p.rejected) for p in heldout)
    return {"seconds_per_epoch": seconds / args.epochs, "heldout_acc": correct / len(heldout),
            "heldout_pairs": len(heldout)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny (~0.1M) or 35m (~35M parameters)")
    parser.add_argument("--prompts", type=int, default=50, help="prompts, 4 pairs each")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--heldout", type=float, default=0.2, help="share of prompts held out")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from rlhf.models import load_causal_lm
    from tools.tiny import build_tiny_llama, hidden_rule_pairs

    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_llama(root / "model", **SIZES[args.size])
        params = sum(p.numel() for p in load_causal_lm(str(model_dir)).parameters())
        pairs = hidden_rule_pairs(args.prompts, 4)
        print(f"model: {args.size} ({params / 1e6:.1f}M parameters), {len(pairs)} hidden-rule pairs, "
              f"{args.epochs} epochs, lr {args.lr}, LoRA r{args.lora_r} all-linear, {args.threads} thread(s)")
        rows = {"rlhf-tui train_reward": ours(root, model_dir, pairs, args)}
        if importlib.util.find_spec("trl") is None:
            print("trl: skipped (not installed; see this script's docstring for a separate venv)")
        else:
            import trl

            rows[f"trl {trl.__version__} RewardTrainer"] = trl_reward_trainer(root, model_dir,
                                                                             rows["rlhf-tui train_reward"], args)
        print(f"{'trainer':32} {'s/epoch':>8} {'held-out acc':>13}")
        for name, row in rows.items():
            print(f"{name:32} {row['seconds_per_epoch']:8.2f} {row['heldout_acc']:9.3f} ({row['heldout_pairs']} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
