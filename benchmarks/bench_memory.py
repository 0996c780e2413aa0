"""Peak memory of one PPO step as the vocabulary grows: the same small model with 8k, 32k and 151k tokens.

    python benchmarks/bench_memory.py [--vocabs 8000,32000,151000] [--code DIR] [--threads 1]

For each vocabulary size it builds a random Qwen2-architecture model (hidden 256, 4 layers, 4 heads, 2 KV
heads, intermediate 688, tied embeddings, as Qwen2.5 ties them) whose byte-level BPE has exactly that many
entries (`tools.tiny.large_byte_level_tokenizer`, ChatML template, two stop tokens), so every sampled id is a
real token. It trains a one-epoch reward model on hidden-rule pairs (whose prompts are the PPO prompts), then
runs ONE full PPO step (rollout, policy/reference/reward scoring, the update: 1 epoch x 4 minibatches) at
batch 16 x 96 new tokens (min_new_tokens = 96, so every response has 96 tokens) in a fresh process, and
reports that process's peak RSS (VmHWM: model load + step) and the RSS with the libraries imported but no
model yet. Goal: peak(151k) / peak(8k) <= 1.3.

`--code DIR` runs the PPO step with the rlhf package found in DIR (the models and reward runs are still
built with this checkout): to measure an older commit, `git worktree add /tmp/before <commit>` and pass
`--code /tmp/before`. No assertions: it prints a table (markdown) for docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ (tiny models) is not installed; it sits beside benchmarks/

BATCH, NEW_TOKENS = 16, 96
PPO = {"ppo.batch_size": BATCH, "ppo.max_new_tokens": NEW_TOKENS, "ppo.minibatches": 4, "ppo.ppo_epochs": 1}
SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 688, "max_position_embeddings": 1024, "tie_word_embeddings": True}


def rss_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process in MiB; getrusage's ru_maxrss would also count the
    parent's RSS at fork time, which Linux carries across exec."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def build_model(out: Path, vocab_size: int) -> float:
    """The benchmark's model with a `vocab_size`-entry tokenizer, saved to `out`; returns its parameters (M)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tools.tiny import CHATML, large_byte_level_tokenizer

    tokenizer = large_byte_level_tokenizer(vocab_size, CHATML)
    config = Qwen2Config(**SHAPE, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(list(CHATML.stop_tokens))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters()) / 1e6


def prepare(root: Path, vocab_size: int) -> tuple[str, str, float]:
    """A workspace on a fresh model with a finished reward run: (workspace, reward run id, parameters in M)."""
    from rlhf.reward import train_reward
    from tools.tiny import hidden_rule_pairs, workspace_with_pairs

    params = build_model(root / "model", vocab_size)
    ws = workspace_with_pairs(root / "ws", root / "model", hidden_rule_pairs(16, 2), "[reward]\nepochs = 1\n")
    return str(ws.root), train_reward(ws, ws.load_config()).run_id, params


def child(workspace: str, reward_run: str) -> None:
    """Runs in a fresh process: build the trainer, one PPO step; prints JSON."""
    import rlhf
    from rlhf.config import Workspace
    from rlhf.ppo import prepare_prompts, prompt_batch
    from rlhf.ppo_trainer import build_trainer
    from rlhf.store import Store

    libraries_mb = rss_mb("VmRSS")
    ws = Workspace(Path(workspace))
    cfg = ws.load_config().override(PPO)
    trainer = build_trainer(ws, cfg, reward_run)
    trainer.model.get_base_model().generation_config.min_new_tokens = NEW_TOKENS
    with Store(ws.db_path) as store:
        prompts, _ = prepare_prompts(store.prompts(), trainer.tokenizer, cfg.model.max_prompt_tokens)
    batch = [prompts[i] for i in prompt_batch(len(prompts), BATCH, 1, cfg.ppo.seed)]
    loaded_mb = rss_mb("VmRSS")
    started = time.perf_counter()
    metrics, _ = trainer.step(batch)
    print(json.dumps({"libraries_mb": libraries_mb, "loaded_mb": loaded_mb, "peak_mb": rss_mb("VmHWM"),
                      "seconds": time.perf_counter() - started, "response_length": metrics["response_length"],
                      "code": str(Path(rlhf.__file__).parent.parent)}))


def measure(workspace: str, reward_run: str, code: str | None, threads: int) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, __file__, "--child", workspace, reward_run], env=env, cwd=code or None,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", default="8000,32000,151000", help="comma-separated vocabulary sizes")
    parser.add_argument("--code", help="run the PPO step with the rlhf package in this directory")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--child", nargs=2, metavar=("WORKSPACE", "REWARD_RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    vocabs = [int(v) for v in args.vocabs.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for vocab in vocabs:
            workspace, reward_run, params = prepare(Path(tmp) / str(vocab), vocab)
            rows[vocab] = {"params": params, **measure(workspace, reward_run, args.code, args.threads)}
            print(f"vocab {vocab}: {json.dumps(rows[vocab])}", file=sys.stderr)
    code = rows[vocabs[0]]["code"]
    print(f"\nOne PPO step, batch {BATCH} x {NEW_TOKENS} new tokens, {args.threads} thread(s), rlhf from {code}\n")
    print("| vocabulary | parameters | libraries RSS MiB | after load MiB | peak RSS MiB | peak / smallest | step s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    smallest = rows[vocabs[0]]["peak_mb"]
    for vocab, row in rows.items():
        print(f"| {vocab:,} | {row['params']:.1f}M | {row['libraries_mb']:.0f} | {row['loaded_mb']:.0f} | "
              f"{row['peak_mb']:.0f} | {row['peak_mb'] / smallest:.2f}x | {row['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
