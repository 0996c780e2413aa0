"""The formulas of PPO for language models, one small pure function each.

Shapes: per-token tensors are `[batch, response_len]` over response tokens only; `mask` is a bool (or
0/1) tensor of the same shape that is true on real tokens. Masks may hold left padding or stop early
(tokens after the first EOS); a masked position never counts anywhere, and values stored there (even
NaN or inf) never leak into a result, because masked sums use `torch.where`, not multiplication.

References: Schulman et al. 2017 (clipped surrogate), Schulman et al. 2016 (GAE), Ziegler et al. 2019
(per-token KL penalty, adaptive KL controller), Huang et al., "The N Implementation Details of RLHF
with PPO" (whitening, value clipping, masks), Schulman's note "Approximating KL divergence" (k1, k3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

WHITEN_EPS = 1e-8
GRPO_STD_EPS = 1e-4  # trl's


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision logits lose too much in softmax; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_and_entropy_from_logits(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Token log-probabilities and the entropy of the full next-token distribution, z = logits / T:

    log p(token) = z[token] - logsumexp(z) ;  H = logsumexp(z) - sum(softmax(z) * z).
    Dividing by the sampling temperature T makes these the log-probs of the distribution the rollout
    actually sampled from (otherwise KL turns negative). One shared logsumexp, no log_softmax copy and a
    contraction (einsum) in place of a [..., V] product keep the [..., V] temporaries few.
    logits [..., V], tokens [...] -> ([...], [...]).
    """
    z = _at_least_fp32(logits) / temperature
    log_normalizer = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normalizer
    return logp, log_normalizer - torch.einsum("...v,...v->...", torch.softmax(z, dim=-1), z)


def logprobs_and_entropy_grad(logits: Tensor, tokens: Tensor, temperature: float, logp: Tensor, entropy: Tensor,
                              grad_logp: Tensor, grad_entropy: Tensor) -> Tensor:
    """Gradient w.r.t. `logits` of sum(grad_logp * log p(token) + grad_entropy * H), given the log-probs and
    entropies that `logprobs_and_entropy_from_logits` returned for them; z = logits / T, p = softmax(z):

    d log p(token) / dz = onehot(token) - p ;  dH / dz = -p * (z - E_p[z]), E_p[z] = logsumexp(z) - H
    = z[token] - log p(token) - H ;  then / T. Built in place on two [..., V] buffers, where autograd through
    the formula holds about ten.
    """
    z = _at_least_fp32(logits) / temperature
    z_token = z.gather(-1, tokens.unsqueeze(-1))
    log_normalizer = z_token - logp.unsqueeze(-1)
    p = torch.sub(z, log_normalizer).exp_()
    weight = z.sub_(log_normalizer - entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
    grad = p.mul_(weight.add_(grad_logp.unsqueeze(-1))).neg_()
    return grad.scatter_add_(-1, tokens.unsqueeze(-1), grad_logp.unsqueeze(-1)).div_(temperature)


class _LogprobsAndEntropy(torch.autograd.Function):
    """`logprobs_and_entropy_from_logits` whose backward is `logprobs_and_entropy_grad`: it keeps only the
    logits for backward, and its gradient needs two [..., V] buffers."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        logp, entropy = logprobs_and_entropy_from_logits(logits, tokens, temperature)
        ctx.save_for_backward(logits, tokens, logp, entropy)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor, None, None]:
        logits, tokens, logp, entropy = ctx.saved_tensors
        return logprobs_and_entropy_grad(logits, tokens, ctx.temperature, logp, entropy, grad_logp,
                                         grad_entropy).to(logits.dtype), None, None


def softcap_logits(logits: Tensor, cap: float) -> Tensor:
    """Final-logit soft-capping (Gemma 2): cap * tanh(logits / cap), squashing logits into (-cap, cap)."""
    return cap * torch.tanh(logits / cap)


def chunked_token_logprobs_and_entropy(hidden: Tensor, lm_head: Callable[[Tensor], Tensor], tokens: Tensor,
                                       temperature: float, chunk_size: int,
                                       softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Log-probs of `tokens` and next-token entropies from last hidden states, holding the logits of one
    chunk of positions at a time: hidden [B, T, H], tokens [B, T] -> ([B, T], [B, T]).

    The B x T positions go in N // chunk_size nearly equal chunks (one when N < 2 x chunk_size): each has
    at least `chunk_size` positions and fewer than twice that, never a small remainder. Per chunk:
    logits = lm_head(h), upcast to fp32, soft-capped when `softcap` is set, then
    `logprobs_and_entropy_from_logits` at `temperature`. Under autograd each chunk is checkpointed: backward
    recomputes its logits rather than keeping every chunk's [chunk, V] tensors, and takes their gradient with
    `logprobs_and_entropy_grad`; the gradients (to `hidden` and to the head's own parameters) equal those of
    the unchunked formula.
    """
    def chunk_stats(chunk_hidden: Tensor, chunk_tokens: Tensor) -> tuple[Tensor, Tensor]:
        logits = _at_least_fp32(lm_head(chunk_hidden))
        if softcap:
            logits = softcap_logits(logits, softcap)
        return _LogprobsAndEntropy.apply(logits, chunk_tokens, temperature)

    n_chunks = max(1, tokens.numel() // chunk_size)
    chunks = zip(hidden.flatten(0, 1).tensor_split(n_chunks), tokens.flatten().tensor_split(n_chunks))
    if torch.is_grad_enabled():
        stats = [checkpoint(chunk_stats, h, t, use_reentrant=False) for h, t in chunks]
    else:
        stats = [chunk_stats(h, t) for h, t in chunks]
    logp, entropy = (torch.cat(parts).view(tokens.shape) for parts in zip(*stats))
    return logp, entropy


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over real tokens: sum(where(mask, x, 0))."""
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over real tokens: sum(mask * x) / sum(mask) (over all tokens, or along `dim`)."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance over real tokens: sum(mask * (x - mean)^2) / (n - 1).

    With a single real token the variance is 0 (nothing to spread), not a division by zero.
    """
    n = mask.sum()
    centered = x - masked_mean(x, mask)
    return masked_sum(centered**2, mask) / (n - 1).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True,
                  moments: tuple[float, float] | None = None) -> Tensor:
    """Whitening over real tokens: (x - mean) / sqrt(var + eps); shift_mean=False adds the mean back.

    mean and var are `masked_mean` and `masked_var` of x, or `moments` when given (measured over a larger batch:
    every rank's share of a data-parallel step). Masked positions come out as 0.
    """
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    whitened = (x - mean) * torch.rsqrt(torch.as_tensor(var + WHITEN_EPS, dtype=x.dtype, device=x.device))
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 KL estimator per sampled token: log pi(y) - log pi_ref(y) (unbiased; negative on single tokens)."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 KL estimator per sampled token: (r - 1) - log r with r = pi_ref(y) / pi(y); always >= 0."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def standard_error(values: Tensor) -> float:
    """Standard error of the mean: sample std (n - 1) / sqrt(n); 0 for fewer than two values."""
    n = values.numel()
    return (values.float().std() / n ** 0.5).item() if n > 1 else 0.0


def kl_negative_beyond_noise(k1_mean: float, k1_sem: float, floor: float = -0.1, z: float = 3.0) -> bool:
    """Negative-KL check: the true KL is >= 0, so a batch's mean k1 below `floor` that is also more than `z`
    standard errors below zero is not noise: sampling and log-probs disagree (top-k/top-p, temperature)."""
    return k1_mean < floor and k1_mean + z * k1_sem < 0


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row: T - 1 - argmax(flip(mask)) ([B, T] -> [B])."""
    return mask.shape[1] - 1 - mask.int().flip(1).argmax(dim=1)


def per_token_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                      kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward: r_t = -beta * k1_t on each real token, plus the score at the last real token.

    Returns (rewards, k1 per token), both 0 on masked positions. A row without real tokens gets nothing.
    """
    mask = mask.bool()
    kl = torch.where(mask, kl_k1(logp, ref_logp), torch.zeros_like(logp))
    rewards = -kl_coef * kl
    has_tokens = mask.any(dim=1)
    score_at_end = torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    rewards = rewards.scatter_add(1, last_token_index(mask).unsqueeze(1), score_at_end.unsqueeze(1))
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, backwards over real tokens:

    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1} ;  returns = A + V.
    "t+1" is the next *real* token of the row (masked positions are skipped); after the last real token
    the episode ends (V = 0, A = 0). Advantages and returns are 0 on masked positions.
    """
    mask = mask.bool()
    batch, length = rewards.shape
    next_value = rewards.new_zeros(batch)
    next_advantage = rewards.new_zeros(batch)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        real = mask[:, t]
        advantages[:, t] = torch.where(real, advantage, 0.0)
        next_advantage = torch.where(real, advantage, next_advantage)
        next_value = torch.where(real, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def masked_sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of each row's mean over its real tokens (every response weighs the same, whatever its
    length); rows without real tokens are left out."""
    has_tokens = mask.bool().any(dim=1)
    return masked_mean(x[has_tokens], mask[has_tokens], dim=1).mean()


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        cliprange: float, per_sequence: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate: L = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), ratio = pi / pi_old.

    The mean is over all real tokens, or with `per_sequence` over responses of their tokens' mean
    (`masked_sequence_mean`, as GRPO does). Returns (loss, clip fraction = share of tokens where the clipped
    term wins, approx KL(old || new) as k3).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = (masked_sequence_mean if per_sequence else masked_mean)(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_k3(old_logp, logp), mask)
    return loss, clipfrac, approx_kl


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024): `rewards` [P, k] of k >= 2 responses per prompt; each response's baseline
    is the mean reward of the other k - 1: A_i = R_i - (sum_j R_j - R_i) / (k - 1)."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def grpo_advantages(scores: Tensor, eps: float = GRPO_STD_EPS) -> Tensor:
    """GRPO (Shao et al. 2024) with std normalisation: `scores` [P, k] of k >= 2 responses per prompt;
    A_i = (s_i - mean(s)) / (std(s) + eps) within each prompt's group, std with n - 1 (a group whose scores
    are all equal gets advantages 0)."""
    return (scores - scores.mean(dim=1, keepdim=True)) / (scores.std(dim=1, keepdim=True) + eps)


def policy_moved_too_far(approx_kl: float, limit: float) -> bool:
    """Early stop of a step's PPO epochs (OpenAI baselines): the policy's approx KL to the rollout policy
    (`clipped_policy_loss`'s k3, nats per token) is above `limit`; limit 0 never stops."""
    return limit > 0 and approx_kl > limit


def clip_scores(scores: Tensor, limit: float) -> tuple[Tensor, Tensor]:
    """Reward-model scores clipped to [-limit, limit] (limit 0: unchanged). Returns (scores, share clipped)."""
    if limit == 0:
        return scores, scores.new_zeros(())
    clipped = scores.clamp(-limit, limit)
    return clipped, (clipped != scores).float().mean()


def score_dropped(previous_mean: float, previous_std: float, mean: float, n_std: float) -> bool:
    """Collapse warning: the mean score fell by more than `n_std` of the previous step's score standard
    deviations in one step (previous_mean - mean > n_std * previous_std); n_std 0 never warns."""
    return n_std > 0 and previous_mean - mean > n_std * previous_std


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       cliprange_value: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)).

    Returns (loss, clip fraction = share of tokens where the clipped term wins).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clipfrac


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Explained variance: 1 - Var(R - V) / Var(R) over real tokens (1 = perfect, <= 0 = no better than
    a constant). NaN when the returns do not vary (undefined)."""
    var_returns = masked_var(returns, mask)
    ratio = masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, 1.0 - ratio, torch.full_like(ratio, float("nan")))


def response_mask(tokens: Tensor, eos_ids: int | Sequence[int], pad_id: int | None = None) -> Tensor:
    """Real-token mask of sampled responses: true up to and including the first EOS, false after it.

    `eos_ids` is one id or several (models with more than one stop token). With a `pad_id` that is not
    an EOS id, pad positions are false too (e.g. left padding).
    """
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)).int()
    mask = torch.cumsum(is_eos, dim=1) - is_eos == 0
    if pad_id is not None and pad_id not in eos_ids:
        mask &= tokens != pad_id
    return mask


def apply_no_eos_penalty(scores: Tensor, has_eos: Tensor, penalty: float) -> Tensor:
    """No-EOS penalty (N-details): a response that never emitted EOS gets `penalty` as its score.

    penalty == 0 turns it off (scores unchanged).
    """
    if penalty == 0:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


def classic_kl_coef_update(kl_coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """Ziegler et al.'s adaptive KL coefficient (trl's classic controller), one update:

    e = clip(KL / target - 1, -0.2, 0.2) ;  beta <- beta * (1 + e * n_samples / horizon).
    With the usual horizon of 10,000 samples and 16 samples a step, 40 steps move beta by at most ~1.3%.
    """
    proportional_error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + proportional_error * n_samples / horizon)


def log_kl_coef_update(kl_coef: float, kl: float, target: float, gain: float, lo: float, hi: float) -> float:
    """The log controller, one update per step whatever the batch size:

    log beta <- log beta + gain * clip(KL / target - 1, -1, 1), then beta is kept within [lo, hi].
    A KL at twice the target or more multiplies beta by e^gain; no KL at all divides it by e^gain.
    """
    proportional_error = min(max(kl / target - 1.0, -1.0), 1.0)
    return min(max(kl_coef * math.exp(gain * proportional_error), lo), hi)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> None:
        """Fixed: nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class ClassicKLController(FixedKLController):
    """`classic_kl_coef_update` after each step; `n_samples` is the number of responses the KL was measured on."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        self.value = classic_kl_coef_update(self.value, current_kl, self.target, n_samples, self.horizon)


class LogKLController(FixedKLController):
    """`log_kl_coef_update` after each step: holds the KL near `target` within tens of steps."""

    def __init__(self, init_kl_coef: float, target: float, gain: float, lo: float, hi: float) -> None:
        super().__init__(min(max(init_kl_coef, lo), hi))
        self.target, self.gain, self.lo, self.hi = float(target), float(gain), float(lo), float(hi)

    def update(self, current_kl: float, n_samples: int) -> None:
        self.value = log_kl_coef_update(self.value, current_kl, self.target, self.gain, self.lo, self.hi)
