"""Demo mode: with no --model and no `[model] name`, rlhf-tui runs on the bundled demo model and prompts.

The person is told so (the app's header says `DEMO_NOTICE`), an empty workspace gets the demo
prompts when the app starts, and settings the person did not choose get `DEMO_DEFAULTS`: sizes that
let each stage (label, reward, PPO) finish in about a minute on a 2-core laptop CPU. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import Config
from .data_io import import_prompts
from .paths import demo_prompts_file
from .store import Store

DEMO_NOTICE = "demo model — pass --model to use your own"
DEMO_PROMPT_TAG = "demo"

# Measured on the shared 2-core box with the shipped 1.4M-parameter model: 14 pairs decided by a
# "prefer polite" rule train to 1.0 held-out accuracy (44 pairs) in 6 epochs, 5 s (3 epochs: 0.86);
# 30 PPO steps of 8 rollouts take 30-40 s and lift the polite share of answers from 0.36 to 0.90. Moving visibly in a few dozen steps needs a LoRA learning rate far above the default (1e-5,
# made for billion-parameter models); the classic KL coefficient 0.2 keeps the answers grammatical
# (0.05 let the share of well-formed answers fall from 0.95 to 0.63). The longest of 20,000 grammar
# answers is 86 tokens: 96 cuts neither labeling samples nor rollouts (a cut rollout earns the no-EOS
# penalty and would teach brevity instead of the labels' preference). The log KL controller lowers beta while
# the KL is below target, as it is for the first dozen demo steps: at the default target of 6 beta fell to
# 0.001 and only 0.49 of the answers stayed well formed; target 2 with beta kept >= 0.1: polite 0.36 -> 0.925,
# well formed 0.95 -> 0.90 (docs/kl_control.md).
DEMO_DEFAULTS: dict[str, Any] = {
    "sampling.max_new_tokens": 96,
    "reward.epochs": 6,
    "ppo.steps": 30,
    "ppo.batch_size": 8,
    "ppo.minibatches": 2,
    "ppo.lr": 3e-4,
    "ppo.init_kl_coef": 0.2,
    "ppo.target_kl": 2.0,
    "ppo.kl_coef_min": 0.1,
    "ppo.max_new_tokens": 96,
}
# The demo model is too small to gain from a second thread, and torch's OpenMP threads spin-wait for each
# other whenever something else holds a core: on the busy 2-core box, headless `rlhf-tui ppo` took
# about 1.2 s per demo step on one thread and 9-12 s on torch's default two.
DEMO_TORCH_THREADS = 1


def is_demo(cfg: Config) -> bool:
    """Demo mode: no policy model named, so `rlhf.models.resolve_model_name` picks the bundled one."""
    return not cfg.model.name


def with_demo_defaults(cfg: Config, chosen: Iterable[str]) -> Config:
    """In demo mode, `cfg` with `DEMO_DEFAULTS` for every `section.key` not in `chosen` (the keys set in
    rlhf.toml or by a flag); outside demo mode, `cfg` unchanged."""
    if not is_demo(cfg):
        return cfg
    chosen = set(chosen)
    return cfg.override({key: value for key, value in DEMO_DEFAULTS.items() if key not in chosen})


def use_demo_threads(cfg: Config) -> None:
    """In demo mode, run torch on `DEMO_TORCH_THREADS` CPU threads (imports torch: call where it runs)."""
    if is_demo(cfg):
        import torch

        torch.set_num_threads(DEMO_TORCH_THREADS)


def import_demo_prompts(store: Store) -> int:
    """Import the demo prompts, tagged "demo", into a workspace that has no prompts; returns how many
    were imported (0 when the workspace already had prompts, which are then left alone)."""
    if store.prompts(limit=1):
        return 0
    imported, _ = import_prompts(store, demo_prompts_file(), [DEMO_PROMPT_TAG])
    return imported
