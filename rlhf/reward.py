"""Reward model: LoRA Bradley-Terry training on the preference DB, and scoring for PPO and the CLI.

The reward model is the policy's causal-LM base with a LoRA adapter and a one-output linear score
head on the last real token's final hidden state: what `AutoModelForSequenceClassification(num_labels=1)`
computes, minus the unused LM head. Keeping the causal-LM module layout means PPO can load the reward
LoRA as a second adapter on the very base its policy runs on (`load_reward_onto`), one base in memory.

Saved under `runs/<run_id>/reward/`:
  adapter/                 peft LoRA weights (safetensors) and adapter_config.json
  score_head.safetensors   the score head's weight [1, hidden]
  reward.json              base model, quantization, tokenizer fingerprint, normalisation mean/std,
                           max_length, the config, a hash of the data, counts, held-out accuracy

Inputs are `format_prompt(prompt)` tokens followed by the response tokens, no EOS appended: the
response as stored by the sampler (cut before EOS) and as shown to the person who labelled it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checkpoints import (CheckpointWriteError, check_checkpoint, checkpoint_path, config_of_run, load_training_state,
                          prune_checkpoints, resumable_run, resume_command, save_training_state, write_checkpoint,
                          write_folder_atomically)
from .config import Config, Workspace
from .errors import RlhfError, cancel_if_stopped, describe_write_error
from .hooks import RunHooks, RunResult
from .lora import lora_config
from .locks import run_lock
from .models import (adapter_active, encode_prompt, format_prompt, load_causal_lm, load_tokenizer,
                     resolve_model_name, safetensors_adapter, tokenizer_fingerprint)
from .ppo_math import last_token_index
from .sampling import truncate_left
from .store import Store, new_run_id

REWARD_SUBDIR = "reward"
ADAPTER_SUBDIR = "adapter"
SCORE_HEAD_FILE = "score_head.safetensors"
META_FILE = "reward.json"
META_FORMAT = 1
PAIRS_FILE = "pairs.json"  # the comparisons a run trains on: a resumed run trains on the same ones
MAX_GRAD_NORM = 1.0  # trl's default; keeps one odd batch from throwing the LoRA far off
STD_FLOOR = 1e-6


# -- formulas ----------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry pair loss, per pair: -log sigmoid(r_chosen - r_rejected - margin) (margin 0 if None)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def symmetric_tie_loss(r_a: Tensor, r_b: Tensor) -> Tensor:
    """Tie loss, per pair: the Bradley-Terry loss both ways, halved; smallest when r_a == r_b."""
    return (bradley_terry_loss(r_a, r_b) + bradley_terry_loss(r_b, r_a)) / 2


def centering_penalty(r_a: Tensor, r_b: Tensor, coef: float) -> Tensor:
    """Centering term coef * mean((r_a + r_b)^2): keeps rewards near zero (the BT loss only sees differences)."""
    return coef * ((r_a + r_b) ** 2).mean()


def reward_loss(r_chosen: Tensor, r_rejected: Tensor, *, margin: Tensor | None = None,
                is_tie: Tensor | None = None, center_coef: float = 0.0) -> Tensor:
    """Batch reward-model loss: mean over pairs of the Bradley-Terry loss (tie loss where `is_tie`),
    plus the centering penalty."""
    per_pair = bradley_terry_loss(r_chosen, r_rejected, margin)
    if is_tie is not None:
        per_pair = torch.where(is_tie, symmetric_tie_loss(r_chosen, r_rejected), per_pair)
    return per_pair.mean() + centering_penalty(r_chosen, r_rejected, center_coef)


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> float:
    """Share of pairs where the chosen response scores strictly higher (NaN for no pairs)."""
    if r_chosen.numel() == 0:
        return math.nan
    return (r_chosen > r_rejected).float().mean().item()


def standardise(scores: Tensor, mean: float, std: float) -> Tensor:
    """Standard score (scores - mean) / std, with mean/std measured on the training responses."""
    return (scores - mean) / std


def is_heldout(prompt_id: int, seed: int, fraction: float) -> bool:
    """Deterministic split by prompt: a hash of (seed, prompt id) mapped to [0, 1) and compared with `fraction`."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def fit_to_length(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """prompt + response in at most `max_length` tokens, and whether anything was cut.

    The prompt is cut from the left (its end is what the answer follows); a response longer than the
    whole budget also loses its tail, keeping one prompt token before it.
    """
    response = response_ids[:max_length - 1]
    prompt, _ = truncate_left(prompt_ids, max_length - len(response))
    cut = len(prompt) + len(response) < len(prompt_ids) + len(response_ids)
    return prompt + response, cut


# -- data --------------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    prompt_id: int
    chosen: list[int]
    rejected: list[int]
    chosen_response_id: int
    rejected_response_id: int
    margin: float
    is_tie: bool
    truncated: bool


def encode_response(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int,
                    messages: list[dict[str, str]] | None = None) -> tuple[list[int], bool]:
    """Token ids the reward model scores for one answer, and whether they were truncated."""
    prompt_ids = encode_prompt(tokenizer, format_prompt(tokenizer, prompt, messages))
    return fit_to_length(prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"], max_length)


def encode_pairs(pairs: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[EncodedPair]:
    out = []
    for pair in pairs:
        chosen, cut_c = encode_response(tokenizer, pair["prompt"], pair["chosen"], max_length, pair["prompt_messages"])
        rejected, cut_r = encode_response(tokenizer, pair["prompt"], pair["rejected"], max_length,
                                          pair["prompt_messages"])
        out.append(EncodedPair(pair["prompt_id"], chosen, rejected, pair["chosen_id"], pair["rejected_id"],
                               pair["margin"] or 0.0, pair["choice"] == "tie", cut_c or cut_r))
    return out


def data_hash(pairs: list[dict[str, Any]]) -> str:
    """A hash of the training data as used: prompts, both answers, choice and margin of every pair."""
    content = [(p["prompt"], p["prompt_messages"], p["chosen"], p["rejected"], p["choice"], p["margin"])
               for p in pairs]
    return hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()[:16]


def pad_left(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded input_ids and attention_mask for a batch of token-id lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


# -- scoring -----------------------------------------------------------------------------------


def _transformer(model: PreTrainedModel | PeftModel) -> nn.Module:
    """The decoder stack (no LM head) of a causal LM, through a PeftModel wrapper if there is one."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.get_decoder()


def raw_scores(model: PreTrainedModel | PeftModel, head: nn.Linear, input_ids: Tensor,
               attention_mask: Tensor) -> Tensor:
    """Unnormalised rewards [batch]: the score head on the final hidden state of each row's last real token.

    Position ids count real tokens only, so a row scores the same however much padding it gets.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = _transformer(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return head(last.to(head.weight.dtype)).squeeze(-1)


@dataclass
class RewardHead:
    """A loaded reward model's score head, normalisation and adapter name, to score on a shared base."""

    head: nn.Linear
    mean: float
    std: float
    adapter_name: str

    @torch.no_grad()
    def score(self, peft_model: PeftModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Standardised rewards [batch] of prompt+response rows (response without EOS; left or right padded).

        Switches to the reward adapter for this forward and restores the previously active adapter,
        the parameters' requires_grad flags and each module's train/eval mode afterwards.
        """
        with adapter_active(peft_model, self.adapter_name):
            scores = raw_scores(peft_model, self.head, input_ids, attention_mask)
        return standardise(scores, self.mean, self.std)


def reward_dir_of(run_dir: Path) -> Path:
    """`runs/<id>/reward`, given either the run directory or the reward directory itself."""
    run_dir = Path(run_dir)
    return run_dir if (run_dir / META_FILE).is_file() else run_dir / REWARD_SUBDIR


def read_reward_meta(run_dir: Path) -> dict[str, Any]:
    path = reward_dir_of(run_dir) / META_FILE
    if not path.is_file():
        raise RlhfError(f"{path.parent}: no trained reward model here (missing {META_FILE}); "
                        "train one with `rlhf-tui train-reward`")
    return json.loads(path.read_text(encoding="utf-8"))


def _load_head(run_dir: Path, device: torch.device) -> RewardHead:
    meta = read_reward_meta(run_dir)
    weight = load_file(str(reward_dir_of(run_dir) / SCORE_HEAD_FILE))["weight"]
    head = nn.Linear(weight.shape[1], 1, bias=False)
    head.weight.data.copy_(weight)
    head.requires_grad_(False)
    norm = meta["normalisation"]
    return RewardHead(head.to(device), norm["mean"], norm["std"], adapter_name="")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_reward_onto(peft_model: PeftModel, run_dir: Path, adapter_name: str = "reward") -> RewardHead:
    """Load a reward run's LoRA as a frozen, named adapter onto `peft_model` (same base) and return its head.

    The active adapter does not change; `RewardHead.score` switches to the reward adapter per call.
    """
    reward = _load_head(run_dir, _model_device(peft_model))
    hidden = peft_model.get_base_model().config.get_text_config().hidden_size
    if reward.head.in_features != hidden:
        raise RlhfError(f"{reward_dir_of(run_dir)}: reward model was trained on a base with hidden size "
                        f"{reward.head.in_features}, not {hidden}: use the base it was trained on")
    peft_model.load_adapter(safetensors_adapter(reward_dir_of(run_dir) / ADAPTER_SUBDIR), adapter_name=adapter_name,
                            is_trainable=False)
    reward.adapter_name = adapter_name
    return reward


def reward_tokenizer_matches(run_dir: Path, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` makes the same token ids and prompt format as the reward model's."""
    return read_reward_meta(run_dir)["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)


def export_sequence_classifier(run_dir: Path, out_dir: Path) -> Path:
    """Write a reward run as a PEFT adapter for `AutoModelForSequenceClassification(num_labels=1)` on its
    base (task SEQ_CLS, the score head as the `score` module), so other tools (trl, transformers) load it
    with `PeftModel.from_pretrained`. Its logits are our raw scores; reward.json beside it holds the
    mean/std that standardise them. Nothing is loaded: the files are rewritten.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RlhfError(f"{out_dir} already exists and is not an empty folder: name a new one")
    reward_dir = reward_dir_of(run_dir)
    meta = read_reward_meta(reward_dir)
    adapter = reward_dir / ADAPTER_SUBDIR
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights["base_model.model.score.weight"] = load_file(str(reward_dir / SCORE_HEAD_FILE))["weight"]
    config |= {"task_type": "SEQ_CLS", "modules_to_save": ["score"],
               "base_model_name_or_path": meta["base_model"]}

    def write(folder: Path) -> None:
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(weights, str(folder / "adapter_model.safetensors"))
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    try:
        return write_folder_atomically(out_dir, write)
    except CheckpointWriteError as exc:
        raise RlhfError(f"{out_dir}: cannot write the reward model: {exc}") from None


class RewardScorer:
    """A trained reward model loaded on its own (base + adapter + head), for `rlhf-tui score`."""

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, reward: RewardHead, max_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.reward = reward
        self.max_length = max_length

    @classmethod
    def from_run(cls, workspace: Workspace, run_id: str, cfg: Config | None = None, *,
                 quantization: str | None = None, device: torch.device | None = None) -> "RewardScorer":
        """The reward model of `run_id` on its own base, quantized as it was trained unless `quantization` says.

        Remote code runs only when the user's own `cfg` allows it (never without one): reward.json and the
        run's stored config come with the workspace (or a copied run folder) and are never trusted with that."""
        run_dir = workspace.run_dir(run_id)
        if not run_dir.is_dir():
            raise RlhfError(f"no run {run_id!r} in {workspace.runs_dir} (see `rlhf-tui runs`)")
        meta = read_reward_meta(run_dir)
        trust = cfg is not None and cfg.model.trust_remote_code
        tokenizer = load_tokenizer(meta["base_model"], trust_remote_code=trust)
        base = load_causal_lm(meta["base_model"], quantization or meta["quantization"], trust_remote_code=trust,
                              device=device)
        model = PeftModel.from_pretrained(base, safetensors_adapter(reward_dir_of(run_dir) / ADAPTER_SUBDIR),
                                          adapter_name="reward")
        reward = _load_head(run_dir, _model_device(model))
        reward.adapter_name = "reward"
        return cls(model, tokenizer, reward, meta["max_length"])

    def score_many(self, items: list[tuple[str, str]],
                   messages: list[list[dict[str, str]] | None] | None = None) -> list[float]:
        """Standardised scores of (prompt, response) items in one batch; `messages[i]` is item i's chat
        prompt, when it has one (padding does not change a row's score: positions count real tokens)."""
        per_item = messages or [None] * len(items)
        seqs = [encode_response(self.tokenizer, p, r, self.max_length, m)[0] for (p, r), m in zip(items, per_item)]
        ids, mask = pad_left(seqs, self.tokenizer.pad_token_id, _model_device(self.model))
        return self.reward.score(self.model, ids, mask).tolist()

    def score(self, prompt: str, response: str, messages: list[dict[str, str]] | None = None) -> float:
        return self.score_many([(prompt, response)], [messages])[0]


# -- training ----------------------------------------------------------------------------------


class _Failed(Exception):
    """Training hit a non-finite loss or gradient: the run fails, the last good weights are saved."""


@dataclass
class _Batch:
    ids: Tensor
    mask: Tensor
    margin: Tensor
    is_tie: Tensor

    @property
    def pairs(self) -> int:
        return self.margin.shape[0]


def _batch(pairs: list[EncodedPair], pad_id: int, device: torch.device) -> _Batch:
    """Chosen rows then rejected rows, so both go through the model in one forward."""
    ids, mask = pad_left([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=device)
    is_tie = torch.tensor([p.is_tie for p in pairs], dtype=torch.bool, device=device)
    return _Batch(ids, mask, margin, is_tie)


def _pair_scores(model: PeftModel, head: nn.Linear, batch: _Batch) -> tuple[Tensor, Tensor]:
    scores = raw_scores(model, head, batch.ids, batch.mask)
    return scores[:batch.pairs], scores[batch.pairs:]


def _batch_metrics(r_c: Tensor, r_r: Tensor, is_tie: Tensor) -> dict[str, float]:
    decided = ~is_tie
    metrics = {"margin_mean": (r_c - r_r)[decided].mean().item() if decided.any() else math.nan,
               "chosen_mean": r_c.mean().item(), "rejected_mean": r_r.mean().item()}
    metrics["train_acc"] = pairwise_accuracy(r_c[decided], r_r[decided])
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


@torch.no_grad()
def _evaluate(model: PeftModel, head: nn.Linear, pairs: list[EncodedPair], batch_size: int, pad_id: int,
              device: torch.device) -> tuple[Tensor, Tensor]:
    """Raw chosen and rejected scores of every decided pair."""
    model.eval()
    decided = [p for p in pairs if not p.is_tie]
    chosen, rejected = [], []
    for start in range(0, len(decided), batch_size):
        r_c, r_r = _pair_scores(model, head, _batch(decided[start:start + batch_size], pad_id, device))
        chosen.append(r_c)
        rejected.append(r_r)
    empty = torch.empty(0, device=device)
    return torch.cat(chosen) if chosen else empty, torch.cat(rejected) if rejected else empty


@torch.no_grad()
def _training_response_stats(model: PeftModel, head: nn.Linear, pairs: list[EncodedPair], batch_size: int,
                             pad_id: int, device: torch.device) -> tuple[float, float]:
    """Mean and std of raw rewards over the distinct training responses (for standardised scores)."""
    model.eval()
    seqs: dict[int, list[int]] = {}
    for p in pairs:
        seqs.setdefault(p.chosen_response_id, p.chosen)
        seqs.setdefault(p.rejected_response_id, p.rejected)
    ordered = list(seqs.values())
    scores = torch.cat([raw_scores(model, head, *pad_left(ordered[i:i + 2 * batch_size], pad_id, device))
                        for i in range(0, len(ordered), 2 * batch_size)])
    std = scores.std().item() if scores.numel() > 1 else 1.0
    return scores.mean().item(), max(std, STD_FLOOR)


def _check_tokenizers(reward_base: str, policy_base: str, tokenizer: PreTrainedTokenizerBase,
                      trust_remote_code: bool) -> None:
    if reward_base == policy_base:
        return
    policy_tok = load_tokenizer(policy_base, trust_remote_code=trust_remote_code)
    if tokenizer_fingerprint(policy_tok) != tokenizer_fingerprint(tokenizer):
        raise RlhfError(f"reward base {reward_base!r} has a different tokenizer than the policy {policy_base!r}: "
                        "PPO could not score the policy's tokens; leave [reward] base empty to use the policy base")


def _usable_pairs(store: Store, cfg: Config) -> tuple[list[dict[str, Any]], int]:
    """Decided pairs (plus ties if configured) whose two answers differ, and how many identical ones were left out."""
    pairs = store.preference_pairs(include_ties=cfg.reward.use_ties)
    usable = [p for p in pairs if p["chosen"] != p["rejected"]]
    missing = cfg.reward.min_pairs - len(usable)
    if missing > 0:
        raise RlhfError(f"only {len(usable)} usable preference pairs, reward training needs at least "
                        f"{cfg.reward.min_pairs}: label {missing} more (or import some with "
                        "`rlhf-tui import-pairs`, or lower [reward] min_pairs)")
    return usable, len(pairs) - len(usable)


def _lora_model(base: PreTrainedModel, cfg: Config, adapter: Path | None = None) -> PeftModel:
    """The trainable reward LoRA on `base`: fresh, or the one saved in `adapter` (a resumed run)."""
    if cfg.reward_quantization != "none":
        # Casts norms to fp32 and lets gradients reach the LoRA through frozen quantized layers.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if adapter is not None:
        return PeftModel.from_pretrained(base, safetensors_adapter(adapter), is_trainable=True)
    return get_peft_model(base, lora_config(base, cfg.reward.lora_r, cfg.reward.lora_alpha, cfg.reward.lora_dropout))


def train_reward(workspace: Workspace, cfg: Config, *, hooks: RunHooks | None = None,
                 store: Store | None = None, resume_run: str | None = None) -> RunResult:
    """Train a LoRA Bradley-Terry reward model on the workspace's preference pairs.

    Writes a `runs` row (kind "reward") and its metrics as training goes, and a resumable checkpoint
    every [reward] checkpoint_every steps, after each epoch and on stop. Saves the adapter, score head
    and reward.json under runs/<run_id>/reward/ when it finishes, and also when stopped (status
    "stopped") or on a non-finite loss (status "failed", the weights from before that step).

    `resume_run` continues a stopped, failed or interrupted reward run from its last checkpoint, with the
    config and the preference pairs it started with.
    """
    hooks = hooks or RunHooks()
    own_store = store is None
    store = store or Store(workspace.db_path)
    try:
        if resume_run is None:
            return _train(workspace, cfg, hooks, store, resume_run)
        store.run(resume_run)  # an unknown id says so before any folder is made for its lock
        with run_lock(workspace.run_dir(resume_run), resume_run):
            return _train(workspace, cfg, hooks, store, resume_run)
    finally:
        if own_store:
            store.close()


def _start_run(workspace: Workspace, store: Store, cfg: Config, total_steps: int, pairs: list[dict[str, Any]],
               identical: int) -> tuple[str, Path]:
    """A new run: its folder with pairs.json (the comparisons it trains on, so that a resume trains on the same
    ones), then its row. Both or neither: a read-only runs/ or a full disk leaves nothing behind."""
    run_id = new_run_id("reward")
    run_dir = workspace.run_dir(run_id)
    record = json.dumps({"comparison_ids": [p["comparison_id"] for p in pairs], "data_hash": data_hash(pairs),
                         "identical_skipped": identical})
    made_runs_dir = not workspace.runs_dir.exists()
    try:
        try:
            write_folder_atomically(run_dir, lambda folder: (folder / PAIRS_FILE).write_text(record, encoding="utf-8"))
        except CheckpointWriteError as exc:
            raise RlhfError(f"{run_dir}: cannot create the run's folder: {exc} (check that {workspace.runs_dir} is "
                            "writable and has room); nothing was written") from None
        store.create_run("reward", cfg.to_dict(), total_steps=total_steps, run_id=run_id)
    except BaseException:
        shutil.rmtree(workspace.runs_dir if made_runs_dir else run_dir, ignore_errors=True)
        raise
    return run_id, run_dir


def _pairs_of_run(run_dir: Path, usable: list[dict[str, Any]], run_id: str,
                  hooks: RunHooks) -> tuple[list[dict[str, Any]], int]:
    """The pairs a resumed run started with, as the store holds them now, and how many identical ones it left
    out; an error if any of them changed."""
    if not (run_dir / PAIRS_FILE).is_file():
        raise RlhfError(f"{run_dir}: no {PAIRS_FILE} (a run of an older rlhf-tui, or a folder that was moved): "
                        "it cannot resume; train a new reward model with `rlhf-tui train-reward`")
    comparison_ids, recorded_hash, identical = _recorded_pairs(run_dir / PAIRS_FILE)
    by_id = {p["comparison_id"]: p for p in usable}
    pairs = [by_id[i] for i in comparison_ids if i in by_id]
    if len(pairs) < len(comparison_ids) or data_hash(pairs) != recorded_hash:
        raise RlhfError(f"the preference pairs run {run_id} trained on changed since it started (labels undone or "
                        "edited): it cannot resume; train a new reward model with `rlhf-tui train-reward`")
    if len(usable) > len(pairs):
        hooks.on_warning(run_id, f"{len(usable) - len(pairs)} pairs labeled since this run started are not used "
                                 "by it: train a new reward model to include them")
    return pairs, identical


def _recorded_pairs(path: Path) -> tuple[list[int], str, int]:
    """What `_start_run` wrote: comparison ids, their data hash, the identical pairs left out."""
    try:
        recorded, problem = json.loads(path.read_text(encoding="utf-8")), ""
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 or not JSON
        recorded, problem = None, describe_write_error(exc)
    keys = ("comparison_ids", "data_hash", "identical_skipped")
    ids, hashed, identical = (recorded.get(key) for key in keys) if isinstance(recorded, dict) else (None,) * 3
    if problem or not (isinstance(ids, list) and all(type(i) is int for i in ids) and isinstance(hashed, str)
                       and type(identical) is int):
        raise RlhfError(f"{path}: damaged, not the list of pairs rlhf-tui wrote ({problem or 'unexpected contents'}): "
                        "the run cannot resume; train a new reward model with `rlhf-tui train-reward`")
    return ids, hashed, identical


def _train(workspace: Workspace, cfg: Config, hooks: RunHooks, store: Store, resume_run: str | None) -> RunResult:
    resumed = resumable_run(store, resume_run, "reward") if resume_run is not None else None
    if resumed is not None:
        cfg = config_of_run(resumed, cfg)
    rc = cfg.reward
    policy_base = resolve_model_name(cfg)
    base_name = rc.base or policy_base
    pairs, identical = _usable_pairs(store, cfg)
    start_step, checkpoint = 0, None
    if resumed is not None:
        run_dir = workspace.run_dir(resumed["id"])
        pairs, identical = _pairs_of_run(run_dir, pairs, resumed["id"], hooks)
        start_step = resumed["checkpoint_step"] or 0
        checkpoint = checkpoint_path(run_dir, start_step) if start_step else None
        if checkpoint is not None:
            check_checkpoint(checkpoint, resumed["id"], "reward", adapter=ADAPTER_SUBDIR,
                             tensor_files=(SCORE_HEAD_FILE,), state_keys=("step", "heldout_acc", "seconds"))
    tokenizer = load_tokenizer(base_name, trust_remote_code=cfg.model.trust_remote_code)
    _check_tokenizers(base_name, policy_base, tokenizer, cfg.model.trust_remote_code)

    encoded = encode_pairs(pairs, tokenizer, rc.max_length)
    train = [p for p in encoded if not is_heldout(p.prompt_id, rc.seed, rc.heldout_fraction)]
    heldout = [p for p in encoded if is_heldout(p.prompt_id, rc.seed, rc.heldout_fraction)]
    if not train:
        raise RlhfError(f"all {len(encoded)} pairs fell in the held-out split: lower [reward] heldout_fraction")
    steps_per_epoch = math.ceil(len(train) / rc.batch_size)
    total_steps = rc.epochs * steps_per_epoch
    torch.manual_seed(rc.seed)
    # Loaded before the run row is written: a model that cannot load leaves no failed run behind.
    base = load_causal_lm(base_name, cfg.reward_quantization, trust_remote_code=cfg.model.trust_remote_code)
    if rc.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cancel_if_stopped(hooks.should_stop(), f"reward run {resume_run}" if resume_run else "reward training")
    if resumed is None:
        run_id, run_dir = _start_run(workspace, store, cfg, total_steps, pairs, identical)
    else:
        run_id = resumed["id"]
        store.resume_run(run_id, start_step)
    hooks.on_start(run_id, "reward", total_steps, start_step)
    counts = {"pairs": len(pairs), "train": len(train), "heldout": len(heldout),
              "heldout_prompts": len({p.prompt_id for p in heldout}), "ties": sum(p.is_tie for p in encoded),
              "truncated": sum(p.truncated for p in encoded), "identical_skipped": identical}
    if counts["truncated"]:
        hooks.on_warning(run_id, f"{counts['truncated']} of {len(encoded)} pairs were longer than "
                                 f"max_length {rc.max_length} and were cut from the left of the prompt")
    if not heldout:
        hooks.on_warning(run_id, "no held-out pairs (too few prompts or heldout_fraction 0): "
                                 "held-out accuracy is not measured")
    try:
        model = _lora_model(base, cfg, checkpoint / ADAPTER_SUBDIR if checkpoint else None)
        device = _model_device(model)
        head = nn.Linear(base.config.get_text_config().hidden_size, 1, bias=False, device=device)
        nn.init.normal_(head.weight, std=getattr(base.config, "initializer_range", 0.02))
        trainer = _Trainer(model, head, tokenizer.pad_token_id, cfg, run_id, store, hooks, device, run_dir,
                           steps_per_epoch)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        try:
            status, message = trainer.run(train, heldout)
        except CheckpointWriteError as exc:  # a full disk: the final save would fail the same way
            kept = f"last checkpoint: step {trainer.saved_step}" if trainer.saved_step else "no checkpoint yet"
            message = (f"{exc}; the run stopped ({kept}). Resume it with `{resume_command('reward', run_id)}` "
                       "once there is room")
            store.update_run(run_id, status="failed", error=message)
            return RunResult(run_id, "failed", message, step=trainer.step)
        mean, std = _training_response_stats(model, head, train, rc.batch_size, tokenizer.pad_token_id, device)
        reward_dir = run_dir / REWARD_SUBDIR
        meta = {
            "format": META_FORMAT, "run_id": run_id, "status": status, "base_model": base_name,
            "quantization": cfg.reward_quantization, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "hidden_size": base.config.get_text_config().hidden_size, "normalisation": {"mean": mean, "std": std},
            "max_length": rc.max_length, "config": cfg.to_dict(), "data_hash": data_hash(pairs), "counts": counts,
            "heldout_acc": trainer.heldout_acc, "steps": trainer.step,
            "epochs_completed": trainer.step // steps_per_epoch, "seconds": round(trainer.seconds(), 3),
        }
        save_reward_model(reward_dir, model, head, meta)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        store.update_run(run_id, status=status, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    store.update_run(run_id, status=status, step=trainer.step, checkpoint=str(reward_dir),
                     checkpoint_step=trainer.step, **({"error": message} if status == "failed" else {}))
    if status == "finished":
        prune_checkpoints(run_dir)  # the reward model is whole: nothing is left to resume
    hooks.on_checkpoint(run_id, trainer.step, str(reward_dir))
    if status != "failed":
        message = _summary(trainer.heldout_acc, counts)
    return RunResult(run_id, status, message, checkpoint=str(reward_dir), step=trainer.step)


def save_reward_model(reward_dir: Path, model: PeftModel, head: nn.Linear, meta: dict[str, Any]) -> None:
    """Write the adapter, score head and reward.json atomically: a failed write (a full disk) leaves no
    half-written reward model (a previous one stays), and says why in one line."""
    def write(folder: Path) -> None:
        model.save_pretrained(str(folder / ADAPTER_SUBDIR), safe_serialization=True)
        save_file({"weight": head.weight.detach().cpu().contiguous()}, str(folder / SCORE_HEAD_FILE))
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    try:
        write_folder_atomically(reward_dir, write)
    except CheckpointWriteError as exc:
        raise RlhfError(f"{reward_dir}: cannot save the reward model: {exc}; then train again") from None


def _summary(heldout_acc: float | None, counts: dict[str, int]) -> str:
    acc = "not measured" if heldout_acc is None else f"{heldout_acc:.3f}"
    return (f"held-out accuracy {acc} on {counts['heldout']} pairs; trained on {counts['train']} pairs "
            f"({counts['truncated']} truncated)")


class _Trainer:
    """The optimisation loop: one optimizer step per batch, held-out evaluation after each epoch, a
    resumable checkpoint every `checkpoint_every` steps, after each epoch and when it stops early."""

    def __init__(self, model: PeftModel, head: nn.Linear, pad_id: int, cfg: Config, run_id: str, store: Store,
                 hooks: RunHooks, device: torch.device, run_dir: Path, steps_per_epoch: int) -> None:
        self.model, self.head, self.pad_id, self.rc = model, head, pad_id, cfg.reward
        self.run_id, self.store, self.hooks, self.device = run_id, store, hooks, device
        self.run_dir, self.steps_per_epoch = run_dir, steps_per_epoch
        self.total_steps = self.rc.epochs * steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=self.rc.lr, weight_decay=0.0)
        self.step = self.saved_step = 0
        self.heldout_acc: float | None = None
        self._seconds_before = 0.0  # training time of the run's earlier sessions (before a resume)
        self._started = time.monotonic()

    def seconds(self) -> float:
        """Time spent training, over every session of the run."""
        return self._seconds_before + time.monotonic() - self._started

    def checkpoint(self) -> None:
        def write(folder: Path) -> None:
            self.model.save_pretrained(str(folder / ADAPTER_SUBDIR), safe_serialization=True)
            save_file({"weight": self.head.weight.detach().cpu().contiguous()}, str(folder / SCORE_HEAD_FILE))
            save_training_state(folder, self.optimizer, {"step": self.step, "heldout_acc": self.heldout_acc,
                                                         "seconds": self.seconds()})

        path = write_checkpoint(self.run_dir, self.step, write)
        self.store.update_run(self.run_id, checkpoint=str(path), checkpoint_step=self.step)
        prune_checkpoints(self.run_dir, keep=path)
        self.hooks.on_checkpoint(self.run_id, self.step, str(path))
        self.saved_step = self.step

    def restore(self, folder: Path) -> None:
        """Continue from a checkpoint: score head, optimizer, RNGs, step (the adapter is loaded with the model)."""
        self.head.weight.data.copy_(load_file(str(folder / SCORE_HEAD_FILE))["weight"])
        state = load_training_state(folder, self.optimizer)
        self.step = self.saved_step = state["step"]
        self.heldout_acc, self._seconds_before = state["heldout_acc"], state["seconds"]

    def _log(self, metrics: dict[str, float]) -> None:
        self.store.log_metrics(self.run_id, self.step, metrics)
        self.hooks.on_step(self.run_id, self.step, metrics)

    def _log_heldout(self, heldout: list[EncodedPair]) -> None:
        r_c, r_r = _evaluate(self.model, self.head, heldout, self.rc.batch_size, self.pad_id, self.device)
        if r_c.numel():
            self.heldout_acc = pairwise_accuracy(r_c, r_r)
            self._log({"heldout_acc": self.heldout_acc, "heldout_loss": bradley_terry_loss(r_c, r_r).mean().item()})

    def _train_step(self, batch: _Batch) -> dict[str, float]:
        self.model.train()
        r_c, r_r = _pair_scores(self.model, self.head, batch)
        loss = reward_loss(r_c, r_r, margin=batch.margin, is_tie=batch.is_tie, center_coef=self.rc.center_coef)
        if not torch.isfinite(loss):
            raise _Failed(f"loss became {loss.item()} at step {self.step + 1}; kept the weights from step "
                          f"{self.step} (try a lower [reward] lr)")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise _Failed(f"gradient became {grad_norm.item()} at step {self.step + 1}; kept the weights from "
                          f"step {self.step} (try a lower [reward] lr)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), **_batch_metrics(r_c, r_r, batch.is_tie)}

    def run(self, train: list[EncodedPair], heldout: list[EncodedPair]) -> tuple[str, str]:
        """Train from `self.step` on. Returns (status, message): finished, stopped (on request) or failed
        (non-finite loss, out of memory); an early end first checkpoints the last good weights."""
        status, message = self._steps(train, heldout)
        if status != "finished" and self.step > self.saved_step:
            self.checkpoint()
        return status, message

    def _steps(self, train: list[EncodedPair], heldout: list[EncodedPair]) -> tuple[str, str]:
        if self.step == 0:
            self._log_heldout(heldout)  # the untrained model: the start of the accuracy curve
        first_epoch, first_batch = divmod(self.step, self.steps_per_epoch)
        for epoch in range(first_epoch, self.rc.epochs):
            # The order is a function of (seed, epoch) alone, so a resumed epoch goes on where it stopped.
            order = list(train)
            random.Random(f"{self.rc.seed}:{epoch}").shuffle(order)
            for batch_index in range(first_batch if epoch == first_epoch else 0, self.steps_per_epoch):
                if self.hooks.should_stop():
                    return "stopped", f"stopped at step {self.step} of {self.total_steps}"
                start = batch_index * self.rc.batch_size
                try:
                    metrics = self._train_step(_batch(order[start:start + self.rc.batch_size], self.pad_id,
                                                      self.device))
                except _Failed as failure:
                    return "failed", str(failure)
                except torch.OutOfMemoryError:
                    self.optimizer.zero_grad(set_to_none=True)
                    return "failed", (f"out of GPU memory at step {self.step + 1}; kept the weights from step "
                                      f"{self.step} (lower [reward] batch_size, now {self.rc.batch_size}, or "
                                      f"max_length, now {self.rc.max_length}, or set [reward] quantization = \"4bit\" "
                                      "or gradient_checkpointing = true)")
                self.step += 1
                done = min(start + self.rc.batch_size, len(order))
                self._log({**metrics, "epoch": epoch + done / len(order)})
                self.store.update_run(self.run_id, step=self.step)
                if self.step % self.rc.checkpoint_every == 0 and batch_index < self.steps_per_epoch - 1:
                    self.checkpoint()
            self._log_heldout(heldout)
            if self.step < self.total_steps:
                self.checkpoint()  # after the held-out evaluation: a resume here starts the next epoch
        return "finished", ""
