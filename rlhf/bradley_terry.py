"""Bradley-Terry reward-model losses and metrics: pure functions of the chosen and rejected rewards."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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


def batch_metrics(r_chosen: Tensor, r_rejected: Tensor, is_tie: Tensor) -> dict[str, float]:
    """A training batch's metrics: mean margin r_chosen - r_rejected and pairwise accuracy over decided pairs
    (left out when there are none), mean chosen and rejected rewards over all pairs."""
    decided = ~is_tie
    metrics = {"margin_mean": (r_chosen - r_rejected)[decided].mean().item() if decided.any() else math.nan,
               "chosen_mean": r_chosen.mean().item(), "rejected_mean": r_rejected.mean().item(),
               "train_acc": pairwise_accuracy(r_chosen[decided], r_rejected[decided])}
    return {k: v for k, v in metrics.items() if not math.isnan(v)}
