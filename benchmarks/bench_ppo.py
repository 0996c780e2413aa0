"""PPO step cost: seconds per step and per phase, rollout vs plain `generate`, the step vs the sum of
its unavoidable passes, and peak memory with all four roles vs the policy alone.

    python benchmarks/bench_ppo.py [--size tiny|35m|both] [--repeats 5] [--quantization none|4bit]

For each size it builds a random Llama (tools.tiny), trains a one-epoch reward model on hidden-rule pairs
(the pairs' prompts are the PPO prompts; the reward's quality does not matter for timing), then:
- after a warm-up step, runs `--repeats` rounds of: one PPO step (seconds per step; median per phase),
  `PPOTrainer.rollout` and a plain `model.generate` with the same model, settings and seed (tokens/s
  ratio; goal >= 0.95), and each pass a step cannot avoid, on one rollout: the policy/value forward, the
  reference forward, the reward forward, one micro-batch forward+backward (x ppo_epochs x minibatches x
  grad_accum) and one optimizer step (x ppo_epochs x minibatches); reports step / sum of the passes
  with generate (goal <= 1.2);
- measures memory in two fresh processes, the policy alone (policy LoRA + value head: rollout,
  one forward, the PPO update) and all roles (a full step, with the reference and the reward adapter on
  the same base): the bytes of all tensors they hold (weights, buffers, optimizer state); peak RSS on
  CPU (and above the RSS with the libraries imported but no model yet: allocator caching makes this
  coarse); max_memory_allocated on CUDA. Goal: ref + reward add <= 10%.
No assertions: it prints a table. Times are the fastest of the rounds, whose calls are interleaved:
on a shared box the minimum is the least noisy figure, and load hits every measurement alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ (tiny models) is not installed; it sits beside benchmarks/

# These modules load no torch, so OMP_NUM_THREADS set in main() still takes effect.
from rlhf.config import Workspace  # noqa: E402
from rlhf.store import Store  # noqa: E402

SIZES = {
    "tiny": {},
    # The tiny corpus gives the BPE only ~600 tokens whatever vocab_size asks, so depth makes up the ~35M.
    "35m": {"vocab_size": 8000, "hidden_size": 512, "num_layers": 11, "num_heads": 8, "intermediate_size": 1376},
}
PPO = {"ppo.batch_size": 16, "ppo.minibatches": 4, "ppo.ppo_epochs": 4, "ppo.max_new_tokens": 48}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far: VmHWM (getrusage's ru_maxrss would also count the
    parent's RSS at fork time, which Linux carries across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def current_rss_mb() -> float:
    """Resident set size now (Linux: resident pages in /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fns: dict[str, object], repeats: int, seed: int | None = None) -> dict[str, float]:
    """Fastest wall seconds of each fn(), calls interleaved (in alternating order) so that load from other
    processes hits all alike; torch is re-seeded before each call when `seed` is given, so sampling draws
    the same tokens."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(repeats):
        for name, fn in list(fns.items())[::1 if repeat % 2 == 0 else -1]:
            if seed is not None:
                torch.manual_seed(seed)
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


def prepare_workspace(root: Path, size: str, quantization: str) -> tuple[Workspace, str, float]:
    """A workspace on a fresh random Llama of `size` with a trained (1 epoch) reward run; also the
    model's parameter count in millions."""
    from rlhf.models import load_causal_lm
    from rlhf.reward import train_reward
    from tools.tiny import build_tiny_llama, hidden_rule_pairs, workspace_with_pairs

    model_dir = build_tiny_llama(root / "model", **SIZES[size])
    params = sum(p.numel() for p in load_causal_lm(str(model_dir)).parameters()) / 1e6
    ws = workspace_with_pairs(root / "ws", model_dir, hidden_rule_pairs(16, 2),
                              f'quantization = "{quantization}"\n[reward]\nquantization = "{quantization}"\nepochs = 1\n')
    reward = train_reward(ws, ws.load_config())
    return ws, reward.run_id, params


def first_batch(ws: Workspace, tokenizer, cfg):
    """The prompts of a run's first PPO step."""
    from rlhf.ppo import prepare_prompts, prompt_batch

    with Store(ws.db_path) as store:
        prompts, _ = prepare_prompts(store.prompts(), tokenizer, cfg.model.max_prompt_tokens)
    return [prompts[i] for i in prompt_batch(len(prompts), cfg.ppo.batch_size, 1, cfg.ppo.seed)]


def load(ws: Workspace, reward_run: str):
    """The trainer on the workspace's config, and the first PPO batch of prompts."""
    from rlhf.ppo_trainer import build_trainer

    cfg = ws.load_config().override(PPO)
    trainer = build_trainer(ws, cfg, reward_run)
    return trainer, first_batch(ws, trainer.tokenizer, cfg)


def loaded_tensors_mb(modules, optimizer) -> float:
    """MiB of the distinct tensors held by these modules (parameters, buffers) and the optimizer state."""
    import torch

    tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values()) / 2**20


def measure_speed(ws: Workspace, reward_run: str, repeats: int) -> dict[str, float]:
    """A warm-up step, then `repeats` rounds of: one PPO step and each unavoidable pass once, interleaved."""
    import torch

    from rlhf.ppo_trainer import response_forward, response_logprobs

    trainer, batch = load(ws, reward_run)
    cfg, model = trainer.cfg, trainer.model
    trainer.step(batch)
    torch.manual_seed(1)
    rollout = trainer.rollout(batch)
    prompt = slice(0, rollout.prompt_len)
    micro = slice(0, cfg.batch_size // (cfg.minibatches * cfg.grad_accum))

    def forward() -> None:
        with torch.no_grad():
            hidden = response_forward(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
            response_logprobs(model, hidden, rollout.response_ids, cfg.temperature)

    def reference_forward() -> None:
        with model.disable_adapter():
            forward()

    def forward_backward() -> None:
        model.train()
        hidden = response_forward(model, rollout.input_ids[micro], rollout.attention_mask[micro], rollout.prompt_len)
        logp, _ = response_logprobs(model, hidden, rollout.response_ids[micro], cfg.temperature)
        (logp.sum() + trainer.value_head(hidden).sum()).backward()
        model.eval()

    step_metrics = []
    times = timed({
        "step": lambda: step_metrics.append(trainer.step(batch)[0]),
        "generate": lambda: model.generate(input_ids=rollout.input_ids[:, prompt],
                                           attention_mask=rollout.attention_mask[:, prompt]),
        "rollout": lambda: trainer.rollout(batch),
        "policy fwd": forward,
        "reference fwd": reference_forward,
        "reward fwd": lambda: trainer.reward.score(rollout),
        "fwd+bwd": forward_backward,
        "optimizer": trainer.optimizer.step,
    }, repeats, seed=1)
    updates = cfg.ppo_epochs * cfg.minibatches
    passes = {name: times[name] for name in ("generate", "policy fwd", "reference fwd", "reward fwd")}
    passes |= {"train fwd+bwd": times["fwd+bwd"] * updates * cfg.grad_accum, "optimizer": times["optimizer"] * updates}
    phases = {name: statistics.median(m[name] for m in step_metrics)
              for name in ("time_rollout", "time_score", "time_train")}
    # Within a round, generate and rollout run on the same weights with the same seed: the same tokens.
    # Their count is taken from the seed-1 rollout before the rounds (steps move the weights, not the lengths
    # much: a random model rarely emits EOS).
    tokens = rollout.response_mask.sum().item()
    return {**phases, "step": times["step"], "generate_tps": tokens / times["generate"],
            "rollout_tps": tokens / times["rollout"], "passes": passes, "passes_sum": sum(passes.values())}


def memory_child(ws_root: str, reward_run: str, roles: str) -> None:
    """Runs in a fresh process: peak memory of the policy alone or of all roles; prints JSON."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlhf.models import load_causal_lm, load_tokenizer, pick_device
    from rlhf.ppo_trainer import POLICY_ADAPTER, PPOTrainer, Scored, ValueHead, response_forward, response_logprobs

    ws = Workspace(Path(ws_root))
    cuda = torch.cuda.is_available()
    before_mb = current_rss_mb()  # libraries loaded, no model yet
    if roles == "all":
        trainer, batch = load(ws, reward_run)
        trainer.step(batch)
        modules = [trainer.model, trainer.value_head, trainer.reward.head.head]
    else:
        cfg = ws.load_config().override(PPO)
        torch.manual_seed(cfg.ppo.seed)
        base = load_causal_lm(cfg.model.name, cfg.model.quantization, device=pick_device())
        lora = LoraConfig(r=cfg.ppo.lora_r, lora_alpha=cfg.ppo.lora_alpha, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        model = get_peft_model(base, lora, adapter_name=POLICY_ADAPTER)
        tokenizer = load_tokenizer(cfg.model.name)
        value_head = ValueHead(base.get_output_embeddings().in_features).to(base.device)
        trainer = PPOTrainer(model, value_head, reward=None, tokenizer=tokenizer, cfg=cfg.ppo)  # never scored
        prompts = first_batch(ws, tokenizer, cfg)
        rollout = trainer.rollout(prompts)
        with torch.no_grad():
            hidden = response_forward(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
            logp, entropy = response_logprobs(model, hidden, rollout.response_ids, cfg.ppo.temperature)
            scored = Scored(logp=logp, values=value_head(hidden), entropy=entropy, ref_logp=logp,
                            scores=torch.zeros(len(prompts)), score_clipped=torch.tensor(0.0))
        del hidden
        trainer.train(rollout, scored, torch.randn_like(logp), torch.randn_like(logp))
        modules = [model, value_head]
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_before_model_mb": before_mb,
                      "tensors_mb": loaded_tensors_mb(modules, trainer.optimizer),
                      "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


def measure_memory(ws: Workspace, reward_run: str, threads: int) -> dict[str, dict[str, float]]:
    out = {}
    for roles in ("policy", "all"):
        child = subprocess.run([sys.executable, __file__, "--memory-child", roles, "--workspace", str(ws.root),
                                "--reward-run", reward_run, "--threads", str(threads)],
                               capture_output=True, text=True, check=True)
        out[roles] = json.loads(child.stdout.strip().splitlines()[-1])
    return out


def report(size: str, params: float, speed: dict, memory: dict, args: argparse.Namespace) -> None:
    print(f"\n== {size}: {params:.1f}M parameters, quantization {args.quantization}, batch {PPO['ppo.batch_size']}, "
          f"{PPO['ppo.ppo_epochs']} epochs x {PPO['ppo.minibatches']} minibatches, "
          f"{PPO['ppo.max_new_tokens']} new tokens max, {args.threads} thread(s)")
    phase_names = ("time_rollout", "time_score", "time_train")
    median_step = sum(speed[name] for name in phase_names)
    print(f"{'seconds per step':28} {speed['step']:8.3f}  fastest; median {median_step:.3f}")
    for name in phase_names:
        print(f"  {name[5:]:26} {speed[name]:8.3f}  ({speed[name] / median_step:.0%} of the median step)")
    print(f"{'rollout tokens/s':28} {speed['rollout_tps']:8.1f}  plain generate {speed['generate_tps']:.1f}  "
          f"ratio {speed['rollout_tps'] / speed['generate_tps']:.3f}  (goal >= 0.95)")
    print(f"{'unavoidable passes (s)':28} {speed['passes_sum']:8.3f}  "
          + ", ".join(f"{k} {v:.3f}" for k, v in speed["passes"].items()))
    print(f"{'step / passes':28} {speed['step'] / speed['passes_sum']:8.3f}  (goal <= 1.2)")
    policy, every = memory["policy"], memory["all"]
    print(f"{'loaded tensors MiB policy/all':28} {policy['tensors_mb']:8.1f} / {every['tensors_mb']:.1f}  "
          f"ratio {every['tensors_mb'] / policy['tensors_mb']:.3f}  (weights, buffers, optimizer state)")
    above = {k: v["peak_rss_mb"] - v["rss_before_model_mb"] for k, v in memory.items()}
    print(f"{'peak RSS MiB policy / all':28} {policy['peak_rss_mb']:8.0f} / {every['peak_rss_mb']:.0f}  "
          f"ratio {every['peak_rss_mb'] / policy['peak_rss_mb']:.3f}")
    print(f"{'  above libraries-only RSS':28} {above['policy']:8.0f} / {above['all']:.0f}  "
          f"ratio {above['all'] / above['policy']:.3f}  (goal <= 1.10)")
    if policy["cuda_peak_mb"] is not None:
        print(f"{'CUDA peak MiB policy / all':28} {policy['cuda_peak_mb']:8.0f} / {every['cuda_peak_mb']:.0f}  "
              f"ratio {every['cuda_peak_mb'] / policy['cuda_peak_mb']:.3f}  (goal <= 1.10)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[*SIZES, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of one PPO step and each pass (the fastest of each counts)")
    parser.add_argument("--quantization", choices=("none", "4bit"), default="none")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)")
    parser.add_argument("--memory-child", choices=("policy", "all"), help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    parser.add_argument("--reward-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.workspace, args.reward_run, args.memory_child)
        return 0
    for size in SIZES if args.size == "both" else [args.size]:
        with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
            ws, reward_run, params = prepare_workspace(Path(tmp), size, args.quantization)
            speed = measure_speed(ws, reward_run, args.repeats)
            memory = measure_memory(ws, reward_run, args.threads)
            report(size, params, speed, memory, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
