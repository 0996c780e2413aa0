"""Token and tensor helpers shared by labeling, reward training and PPO: cutting and padding token-id lists,
and the decoder forward whose positions count real tokens only."""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel


def truncate_left(ids: list[int], max_tokens: int) -> tuple[list[int], int]:
    """Left truncation: keep the last `max_tokens` ids (the end of a prompt is what the answer follows).

    Returns (kept ids, number of ids cut).
    """
    cut = max(0, len(ids) - max_tokens)
    return ids[cut:], cut


def fit_to_length(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """prompt + response in at most `max_length` tokens, and whether anything was cut.

    The prompt is cut from the left (its end is what the answer follows); a response longer than the
    whole budget also loses its tail, keeping one prompt token before it.
    """
    response = response_ids[:max_length - 1]
    prompt, _ = truncate_left(prompt_ids, max_length - len(response))
    cut = len(prompt) + len(response) < len(prompt_ids) + len(response_ids)
    return prompt + response, cut


def pad_left(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded input_ids and attention_mask for a batch of token-id lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def real_token_positions(attention_mask: Tensor) -> Tensor:
    """Position ids that count real tokens only (padding repeats position 0), as `generate` gives left-padded
    prompts: a row gets the same positions however much padding it has."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_hidden_states(model: PreTrainedModel | PeftModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states [B, T, H] of a causal LM's decoder stack (no LM head), positions over real tokens.

    Through a PeftModel wrapper the adapter that is active (or none, inside `disable_adapter()`) runs.
    """
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    return lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=real_token_positions(attention_mask), use_cache=False).last_hidden_state


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's (first) parameters."""
    return next(model.parameters()).device
