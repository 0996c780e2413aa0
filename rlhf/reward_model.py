"""The reward model: its files, loading it (alone or onto PPO's base) and scoring with it.

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
Training it is `rlhf/reward.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checkpoints import CheckpointWriteError, write_folder_atomically
from .config import Config, Workspace
from .errors import RlhfError
from .models import (adapter_active, encode_prompt, format_prompt, load_causal_lm, load_tokenizer,
                     safetensors_adapter, tokenizer_fingerprint)
from .ppo_math import last_token_index
from .tokens import decoder_hidden_states, fit_to_length, model_device, pad_left

REWARD_SUBDIR = "reward"
ADAPTER_SUBDIR = "adapter"
SCORE_HEAD_FILE = "score_head.safetensors"
META_FILE = "reward.json"
META_FORMAT = 1


def standardise(scores: Tensor, mean: float, std: float) -> Tensor:
    """Standard score (scores - mean) / std, with mean/std measured on the training responses."""
    return (scores - mean) / std


def encode_response(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int,
                    messages: list[dict[str, str]] | None = None) -> tuple[list[int], bool]:
    """Token ids the reward model scores for one answer, and whether they were truncated."""
    prompt_ids = encode_prompt(tokenizer, format_prompt(tokenizer, prompt, messages))
    return fit_to_length(prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"], max_length)


def raw_scores(model: PreTrainedModel | PeftModel, head: nn.Linear, input_ids: Tensor,
               attention_mask: Tensor) -> Tensor:
    """Unnormalised rewards [batch]: the score head on the final hidden state of each row's last real token.

    Position ids count real tokens only, so a row scores the same however much padding it gets.
    """
    hidden = decoder_hidden_states(model, input_ids, attention_mask)
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


def load_reward_onto(peft_model: PeftModel, run_dir: Path, adapter_name: str = "reward") -> RewardHead:
    """Load a reward run's LoRA as a frozen, named adapter onto `peft_model` (same base) and return its head.

    The active adapter does not change; `RewardHead.score` switches to the reward adapter per call.
    """
    reward = _load_head(run_dir, model_device(peft_model))
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
        reward = _load_head(run_dir, model_device(model))
        reward.adapter_name = "reward"
        return cls(model, tokenizer, reward, meta["max_length"])

    def score_many(self, items: list[tuple[str, str]],
                   messages: list[list[dict[str, str]] | None] | None = None) -> list[float]:
        """Standardised scores of (prompt, response) items in one batch; `messages[i]` is item i's chat
        prompt, when it has one (padding does not change a row's score: positions count real tokens)."""
        per_item = messages or [None] * len(items)
        seqs = [encode_response(self.tokenizer, p, r, self.max_length, m)[0] for (p, r), m in zip(items, per_item)]
        ids, mask = pad_left(seqs, self.tokenizer.pad_token_id, model_device(self.model))
        return self.reward.score(self.model, ids, mask).tolist()

    def score(self, prompt: str, response: str, messages: list[dict[str, str]] | None = None) -> float:
        return self.score_many([(prompt, response)], [messages])[0]


