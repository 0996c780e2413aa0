"""Workspace configuration: `rlhf.toml` with sections model, sampling, label, reward, ppo.

Every field has a default and a one-line doc (`rlhf-tui config` prints them all). Unknown keys and
values out of range raise `ConfigError` naming `section.key`. CLI flags override the file through
`Config.override`, which runs the same validation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

from .errors import ConfigError, RlhfError

CONFIG_FILE = "rlhf.toml"
DB_FILE = "rlhf.db"
RUNS_DIR = "runs"
# What store.create_run makes (kind-date-time-hex); no separators, so runs/<id> stays inside runs/.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _f(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its doc and bounds (lo/hi inclusive unless lo_open)."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


QUANTIZATION = ("none", "4bit", "8bit")
KL_CONTROLLERS = ("log", "classic", "fixed")
ALGORITHMS = ("ppo", "rloo", "grpo")
SELECTIONS = ("random", "uncertain")  # [label] selection: how served pairs are chosen
# Upper bounds of the int settings: far above any real use, low enough that a typo (an extra zero, a pasted
# 20-digit number) is refused with its key instead of running until the kernel kills the process.
MAX_SEED = 2**32 - 1  # numpy's and most tools' seed range
MAX_TOKENS = 131072  # the longest context of current open models
MAX_BATCH = 1024  # prompts or pairs at once: a 1024-prompt PPO rollout already needs a large GPU
MAX_LORA_R = 1024
MAX_STEPS = 1_000_000


@dataclass
class ModelConfig:
    name: str = _f("", "Hub id or local path of the policy base model; empty = the bundled demo model.")
    quantization: str = _f("none", "Base weights: none, 4bit (bitsandbytes NF4) or 8bit.", choices=QUANTIZATION)
    trust_remote_code: bool = _f(False, "Run model code shipped with the checkpoint (off: security).")
    max_prompt_tokens: int = _f(256, "Prompts longer than this are cut from the left, with a notice.", lo=8,
                                hi=MAX_TOKENS)
    free_during_runs: str = _f("auto", "Free the labeling model while a reward or PPO run trains (they load their "
                               "own base), reloading it after: auto (on a GPU), always or never.",
                               choices=("auto", "always", "never"))


@dataclass
class SamplingConfig:
    temperature: float = _f(1.0, "Sampling temperature for labeling pairs (> 0; try 1.5 for variety).",
                            lo=0.0, lo_open=True, hi=10.0)
    top_k: int = _f(0, "Keep only the k most likely tokens (0 = off).", lo=0, hi=1_000_000)
    top_p: float = _f(1.0, "Nucleus sampling mass, in (0, 1].", lo=0.0, lo_open=True, hi=1.0)
    max_new_tokens: int = _f(64, "Longest answer, in tokens.", lo=1, hi=8192)
    repetition_penalty: float = _f(1.0, "Penalty for repeated tokens (1.0 = off).", lo=0.0, lo_open=True)
    seed: int = _f(0, "Seed for sampling and prompt order.", lo=0, hi=MAX_SEED)
    prefetch: int = _f(4, "Pairs kept ready ahead of the person (0 = generate on demand).", lo=0, hi=64)
    max_resample: int = _f(3, "Re-sample identical twins up to this many times.", lo=0, hi=20)


@dataclass
class LabelConfig:
    annotator: str = _f("", "Name stored with each decision; empty = the OS user.")
    guidelines: str = _f("guidelines.md", "Markdown file in the workspace shown by `?` and at first start; "
                                          "a path outside the workspace (symlinks resolved) is refused.")
    keymap: dict = _f({}, "Binding id -> keys, e.g. {prefer_a = \"j\"} (Textual keymap).")
    selection: str = _f("random", "Which pairs are served: random, or uncertain (of `candidates` sampled pairs, "
                        "the one the reward model is least sure about; needs a finished reward run).",
                        choices=SELECTIONS)
    candidates: int = _f(4, "selection = uncertain: pairs sampled per pair served (each costs a generation; "
                         "the rest stay stored, unlabeled).", lo=2, hi=64)
    uncertainty_runs: int = _f(1, "selection = uncertain: the latest reward runs that judge a pair; 1 = the "
                               "smallest score margin, 2 = also their disagreement.", lo=1, hi=4)
    repeat_every: int = _f(0, "Every Nth pair served re-shows a pair you already labeled, sides swapped "
                           "(self-consistency in `stats`); 0 = off.", lo=0, hi=1000)
    agreement_window: int = _f(50, "The last N labels the reward model's agreement with you is measured on.",
                               lo=5, hi=100_000)


@dataclass
class RewardConfig:
    base: str = _f("", "Reward base model; empty = the policy base (lets PPO share one base).")
    quantization: str = _f("model", "Reward base weights: model (as [model] quantization, so PPO can share one "
                           "base), none, 4bit or 8bit.", choices=("model", *QUANTIZATION))
    lora_r: int = _f(16, "LoRA rank.", lo=1, hi=MAX_LORA_R)
    lora_alpha: int = _f(32, "LoRA alpha.", lo=1, hi=4 * MAX_LORA_R)
    lora_dropout: float = _f(0.0, "LoRA dropout.", lo=0.0, hi=0.9)
    lr: float = _f(1e-3, "Learning rate.", lo=0.0, lo_open=True, hi=1.0)
    epochs: int = _f(3, "Passes over the training pairs.", lo=1, hi=1000)
    batch_size: int = _f(8, "Pairs per optimizer step.", lo=1, hi=MAX_BATCH)
    max_length: int = _f(512, "Longest prompt+response in tokens; the prompt is cut from the left.", lo=8,
                         hi=MAX_TOKENS)
    heldout_fraction: float = _f(0.1, "Share of prompts held out for pairwise accuracy.", lo=0.0, hi=0.9)
    center_coef: float = _f(0.01, "Centering term coef * mean((r_c + r_r)^2); 0 = off.", lo=0.0)
    use_ties: bool = _f(False, "Train on ties with a symmetric loss.")
    use_eval_labels: bool = _f(False, "Train on blind-evaluation decisions too (off: they measure the policy; a "
                               "reward model trained on them leaks the test into what it tests).")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory: recompute the decoder's activations in "
                                      "backward (long answers, big models).")
    min_pairs: int = _f(8, "Refuse to train on fewer usable pairs.", lo=1, hi=MAX_STEPS)
    checkpoint_every: int = _f(50, "Save a resumable checkpoint every K steps (also after each epoch and on stop).",
                               lo=1, hi=MAX_STEPS)
    seed: int = _f(0, "Seed for the split, init and shuffling.", lo=0, hi=MAX_SEED)


@dataclass
class PPOConfig:
    algorithm: str = _f("ppo", "ppo (clipped policy loss, value head, GAE; the KL in the per-token reward), rloo "
                        "(no value head: baseline = the mean reward of the prompt's other samples; KL in the "
                        "reward) or grpo (no value head: advantage = score normalised within the prompt's samples; "
                        "KL as a k3 loss term weighted by beta). See docs/kl_control.md.", choices=ALGORITHMS)
    steps: int = _f(100, "PPO steps (rollout + update) to run.", lo=1, hi=MAX_STEPS)
    batch_size: int = _f(16, "Prompts per rollout.", lo=1, hi=MAX_BATCH)
    samples_per_prompt: int = _f(4, "rloo and grpo: responses sampled per prompt (>= 2; a step trains on "
                                 "batch_size x this many); ppo samples one.", lo=2, hi=MAX_BATCH)
    minibatches: int = _f(4, "Minibatches per PPO epoch.", lo=1, hi=MAX_BATCH)
    ppo_epochs: int = _f(4, "Passes over each rollout.", lo=1, hi=100)
    lr: float = _f(1e-5, "Learning rate (policy LoRA and value head).", lo=0.0, lo_open=True, hi=1.0)
    adam_eps: float = _f(1e-5, "Adam epsilon (1e-5 tames PyTorch Adam's large first updates).", lo=0.0, lo_open=True)
    init_kl_coef: float = _f(0.05, "Initial KL penalty coefficient beta.", lo=0.0)
    kl_controller: str = _f("log", "How beta steers the KL to target_kl: log (log beta moves by kl_gain x "
                            "clip(KL/target - 1, -1, 1) each step, within [kl_coef_min, kl_coef_max]), classic "
                            "(Ziegler et al.'s, horizon kl_horizon: barely moves in a run of hundreds of steps) or "
                            "fixed. See docs/kl_control.md.", choices=KL_CONTROLLERS)
    target_kl: float = _f(6.0, "Target KL (nats per response) for the log and classic controllers.", lo=0.0,
                          lo_open=True)
    kl_gain: float = _f(0.2, "Log controller: the most log beta moves in one step (0.2: x1.22).", lo=0.0,
                        lo_open=True, hi=2.0)
    kl_coef_min: float = _f(0.001, "Log controller: lowest beta.", lo=0.0, lo_open=True)
    kl_coef_max: float = _f(10.0, "Log controller: highest beta.", lo=0.0, lo_open=True, hi=1000.0)
    kl_horizon: int = _f(10000, "Classic controller: horizon, in responses.", lo=1, hi=10**9)
    gamma: float = _f(1.0, "Discount.", lo=0.0, hi=1.0)
    lam: float = _f(0.95, "GAE lambda.", lo=0.0, hi=1.0)
    cliprange: float = _f(0.2, "Policy ratio clip.", lo=0.0, lo_open=True)
    cliprange_value: float = _f(0.2, "Value clip.", lo=0.0, lo_open=True)
    vf_coef: float = _f(0.1, "Value loss weight.", lo=0.0)
    ent_coef: float = _f(0.0, "Entropy bonus weight.", lo=0.0)
    max_grad_norm: float = _f(1.0, "Gradient norm clip.", lo=0.0, lo_open=True)
    max_policy_kl_per_step: float = _f(0.05, "Stop a step's remaining PPO epochs once the policy's approx KL to "
                                       "the policy that sampled the rollout passes this (nats per token; not the "
                                       "reward KL of target_kl; 0 = off).", lo=0.0)
    score_clip: float = _f(0.0, "Clip reward-model scores (reward-std units) to [-c, c] (0 = off).", lo=0.0)
    score_drop_warning: float = _f(1.5, "Warn when the mean score falls by more than this many of the previous "
                                   "step's score standard deviations in one step (0 = off).", lo=0.0)
    temperature: float = _f(1.0, "Rollout temperature (log-probs use logits / T).", lo=0.0, lo_open=True, hi=10.0)
    max_new_tokens: int = _f(48, "Longest rollout response.", lo=1, hi=8192)
    no_eos_penalty: float = _f(-1.0, "Score given to responses that never emit EOS (0 = off).")
    lora_r: int = _f(16, "Policy LoRA rank.", lo=1, hi=MAX_LORA_R)
    lora_alpha: int = _f(32, "Policy LoRA alpha.", lo=1, hi=4 * MAX_LORA_R)
    grad_accum: int = _f(1, "Gradient accumulation steps per minibatch.", lo=1, hi=MAX_BATCH)
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the policy forward.")
    checkpoint_every: int = _f(10, "Save a checkpoint every K steps (and on stop).", lo=1, hi=MAX_STEPS)
    keep_checkpoints: int = _f(3, "Checkpoints a run keeps on disk: its newest N (the latest, which a resume uses, "
                               "is always one); each can be evaluated (`rlhf-tui eval prepare --checkpoint STEP`).",
                               lo=1, hi=MAX_STEPS)
    prompt_tag: str = _f("", "Use only prompts with this tag (empty = all).")
    sft_adapter: str = _f("", "Start from this SFT LoRA adapter dir; the frozen SFT adapter is then the KL "
                          "reference (empty = start from the base, reference = adapters off).")
    seed: int = _f(0, "Seed for prompts order, sampling and init.", lo=0, hi=MAX_SEED)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "sampling": SamplingConfig,
    "label": LabelConfig,
    "reward": RewardConfig,
    "ppo": PPOConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Config":
        cfg = cls()
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, source=source)
        return cfg

    @property
    def reward_quantization(self) -> str:
        """How the reward base is loaded: [reward] quantization, or [model]'s when that says "model"."""
        return self.model.quantization if self.reward.quantization == "model" else self.reward.quantization

    @classmethod
    def load(cls, path: Path) -> "Config":
        """Read a TOML config; a missing file gives the defaults."""
        if not path.exists():
            return cls()
        return cls.from_dict(_read_toml(path), source=str(path))

    def set(self, dotted: str, value: Any, source: str = "config") -> None:
        """Set `section.key` to `value` after checking its type and range."""
        if dotted == "ppo.adaptive_kl":  # replaced by ppo.kl_controller; old files and old runs' configs still load
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {dotted} (now ppo.kl_controller) must be bool, got {value!r}")
            dotted, value = "ppo.kl_controller", "classic" if value else "fixed"
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section in {dotted!r} (known: {', '.join(SECTIONS)})")
        obj = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {dotted!r} (known: {', '.join(fields)})")
        setattr(obj, key, _checked(fields[key], value, f"{source}: {dotted}"))

    def override(self, overrides: dict[str, Any]) -> "Config":
        """A copy with `section.key` overrides applied; None values (flags not given) are ignored."""
        cfg = Config.from_dict(self.to_dict())
        for dotted, value in overrides.items():
            if value is not None:
                cfg.set(dotted, value, source="option")
        return cfg

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        """This config as a TOML file (`rlhf-tui config --show`); `Config.load` reads it back."""
        return "\n".join(f"[{name}]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())
                         for name, values in self.to_dict().items())


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def keys_set_in(path: Path) -> set[str]:
    """The `section.key`s a config file sets (none when there is no file): the settings a person chose."""
    if not path.exists():
        return set()
    return {f"{section}.{key}" for section, values in _read_toml(path).items() if isinstance(values, dict)
            for key in values}


def _checked(f: dataclasses.Field, value: Any, where: str) -> Any:
    expected = type(f.default) if f.default is not dataclasses.MISSING else type(f.default_factory())
    meta = f.metadata
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {', '.join(meta['choices'])}, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        raise ConfigError(f"{where} must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} must be <= {hi}, got {value!r}")
    return value


def describe_defaults() -> str:
    """A commented TOML file of every field with its default and doc."""
    lines = []
    for name, section in SECTIONS.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


@dataclass
class Workspace:
    """A directory holding rlhf.toml (optional), rlhf.db and runs/."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def db_path(self) -> Path:
        return self.root / DB_FILE

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    def run_dir(self, run_id: str) -> Path:
        """runs/<run_id>; an id that is not a plain name (a path, `..`) is refused, so no run reaches outside."""
        if not RUN_ID.fullmatch(run_id):
            raise RlhfError(f"{run_id!r} is not a run id (see `rlhf-tui runs`)")
        return self.runs_dir / run_id

    def load_config(self) -> Config:
        return Config.load(self.config_path)

    def owns(self, path: str | Path) -> bool:
        """Whether writing `path` would write over this workspace's own state: rlhf.db (and its SQLite side
        files), rlhf.toml or anything under runs/ — through symlinks and hard links too."""
        target = Path(path).expanduser().resolve()
        own = [self.config_path, self.db_path,
               *(self.db_path.with_name(self.db_path.name + side) for side in ("-wal", "-shm", "-journal"))]
        if target in own or target == self.runs_dir or self.runs_dir in target.parents:
            return True
        return target.exists() and any(p.exists() and os.path.samefile(p, target) for p in own)
