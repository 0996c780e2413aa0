"""PPO on random-weight models with real shapes, on one GPU: seconds per step, rollout tokens/s, peak memory.

    python benchmarks/bench_gpu.py [--configs qwen2.5-0.5b,llama-3.2-1b,qwen2.5-7b] [--quantization 4bit]
                                   [--steps 2] [--workdir DIR] [--smoke]

Each config is built from transformers' config class with the published shapes written below (no hub):
random bf16 weights, initialised on the GPU and saved as safetensors (the 7B is ~15 GB on disk, written to
--workdir and deleted afterwards), and a byte-level BPE with exactly the model's vocabulary size
(tools.tiny.large_byte_level_tokenizer, ChatML). Then, in a fresh process per config (a clean CUDA
context): a one-epoch reward run on the same base and quantization (so all four roles share one base:
policy LoRA, value head, reference = adapters off, reward adapter), and PPO at batch 16 x 128 new tokens
(min_new_tokens = 128: every response is that long) with gradient checkpointing on, loaded through
rlhf.models.load_causal_lm like a user's model. One warm-up step, then --steps timed steps. Peak GPU memory
is torch.cuda.max_memory_allocated from just before the PPO model loads to the end (held_before_gb in the
JSON lines says what was still allocated then: ~0). Goal: the 7B in 4-bit under 12 GB.

--smoke: a tiny model of each config's family (hidden 64, 2 layers, vocabulary 1,000), batch 4 x 8 tokens,
no warm-up, one step; runs on CPU when there is no GPU, to prove the script works.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ (tiny models) is not installed; it sits beside benchmarks/

# Published shapes (each model's config.json on the hub).
CONFIGS: dict[str, tuple[str, dict[str, object]]] = {
    "qwen2.5-0.5b": ("Qwen2Config", {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}),
    "llama-3.2-1b": ("LlamaConfig", {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}),
    "qwen2.5-7b": ("Qwen2Config", {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}),
}
SMOKE_SHAPE = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512}
PPO = {"ppo.batch_size": 16, "ppo.max_new_tokens": 128, "ppo.minibatches": 4, "ppo.ppo_epochs": 1,
       "ppo.gradient_checkpointing": True}
SMOKE_PPO = {"ppo.batch_size": 4, "ppo.max_new_tokens": 8, "ppo.minibatches": 2, "ppo.ppo_epochs": 1,
             "ppo.gradient_checkpointing": True}
GOAL_7B_GB = 12.0


def build_model(out: Path, name: str, smoke: bool) -> float:
    """Random bf16 weights of config `name` (tiny with `smoke`) and a tokenizer of its vocabulary, saved to
    `out`; returns the parameter count in billions. The weights are made on the GPU when there is one."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tools.tiny import CHATML, large_byte_level_tokenizer

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per config would garble the table
    config_class, shape = CONFIGS[name]
    shape = {**shape, **SMOKE_SHAPE} if smoke else shape
    tokenizer = large_byte_level_tokenizer(int(shape["vocab_size"]), CHATML)
    config = getattr(transformers, config_class)(**shape, eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(list(CHATML.stop_tokens))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the PPO child needs this memory
    return params


def child(model_dir: str, quantization: str, steps: int, smoke: bool) -> None:
    """Runs in a fresh process: a reward run, then PPO steps on the same base; prints JSON."""
    import torch

    from rlhf.ppo import prepare_prompts, prompt_batch
    from rlhf.ppo_trainer import build_trainer
    from rlhf.reward import train_reward
    from rlhf.store import Store
    from tools.tiny import hidden_rule_pairs, workspace_with_pairs

    cuda = torch.cuda.is_available()
    settings = SMOKE_PPO if smoke else PPO
    with tempfile.TemporaryDirectory(prefix="bench-gpu-ws-") as tmp:
        ws = workspace_with_pairs(Path(tmp) / "ws", model_dir, hidden_rule_pairs(16, 2),
                                  f'quantization = "{quantization}"\n[reward]\nquantization = "{quantization}"\n'
                                  "epochs = 1\n")
        started = time.perf_counter()
        reward = train_reward(ws, ws.load_config())
        if reward.status != "finished":
            raise SystemExit(f"reward run {reward.status}: {reward.message}")
        reward_s = time.perf_counter() - started
        gc.collect()  # the reward run's own copy of the base must be gone before PPO's peak is measured
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        held_before_gb = torch.cuda.memory_allocated() / 2**30 if cuda else None
        cfg = ws.load_config().override(settings)
        trainer = build_trainer(ws, cfg, reward.run_id)
        trainer.model.get_base_model().generation_config.min_new_tokens = cfg.ppo.max_new_tokens
        with Store(ws.db_path) as store:
            prompts, _ = prepare_prompts(store.prompts(), trainer.tokenizer, cfg.model.max_prompt_tokens)
        batch_size = cfg.ppo.batch_size
        if not smoke:
            trainer.step([prompts[i] for i in prompt_batch(len(prompts), batch_size, 1, cfg.ppo.seed)])  # warm-up
        timed = [trainer.step([prompts[i] for i in prompt_batch(len(prompts), batch_size, step, cfg.ppo.seed)])[0]
                 for step in range(2, 2 + steps)]
    print(json.dumps({
        "reward_run_s": reward_s,
        "step_s": sum(m["time_rollout"] + m["time_score"] + m["time_train"] for m in timed) / len(timed),
        "rollout_tokens_per_s": sum(m["response_length"] * batch_size for m in timed)
        / sum(m["time_rollout"] for m in timed),
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "held_before_gb": held_before_gb,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--quantization", choices=("none", "4bit", "8bit"), default="4bit")
    parser.add_argument("--steps", type=int, default=2, help="timed PPO steps after the warm-up")
    parser.add_argument("--workdir", default=None, help="where the models are written (default: the temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one step: proves the script works")
    parser.add_argument("--child", nargs=1, metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 1 if args.smoke else args.steps
    if args.child:
        child(args.child[0], args.quantization, steps, args.smoke)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = {}
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.workdir) as tmp:
            started = time.perf_counter()
            params = build_model(Path(tmp) / name, name, args.smoke)
            built_s = time.perf_counter() - started
            command = [sys.executable, __file__, "--child", str(Path(tmp) / name), "--quantization", args.quantization,
                       "--steps", str(steps), *(["--smoke"] if args.smoke else [])]
            out = subprocess.run(command, capture_output=True, text=True)
            shutil.rmtree(Path(tmp) / name, ignore_errors=True)
        if out.returncode:
            print(f"{name}: failed (exit {out.returncode})\n{out.stderr[-3000:]}", file=sys.stderr)
            rows[name] = None
            continue
        rows[name] = {"params_b": params, "build_s": built_s, **json.loads(out.stdout.strip().splitlines()[-1])}
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    shape = "smoke shapes, batch 4 x 8 tokens" if args.smoke else "batch 16 x 128 new tokens, gradient checkpointing"
    print(f"\nPPO, {args.quantization}, {shape}, all four roles on one base\n")
    print("| config | parameters | s / step | rollout tokens/s | peak GPU GB (allocated) | reserved GB | "
          "reward run s | device |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, row in rows.items():
        if row is None:
            print(f"| {name} | failed | | | | | | |")
            continue
        peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.2f}"
        reserved = "-" if row["reserved_gb"] is None else f"{row['reserved_gb']:.2f}"
        print(f"| {name} | {row['params_b'] * 1e3:,.1f}M | {row['step_s']:.2f} | {row['rollout_tokens_per_s']:.0f} | "
              f"{peak} | {reserved} | {row['reward_run_s']:.1f} | {row['device']} |")
    big = rows.get("qwen2.5-7b")
    if big and big["peak_gb"] is not None and not args.smoke:
        verdict = "meets" if big["peak_gb"] < GOAL_7B_GB else "misses"
        print(f"\n7B {args.quantization}: peak {big['peak_gb']:.2f} GB {verdict} the goal of < {GOAL_7B_GB:.0f} GB")
    return 1 if any(row is None for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
