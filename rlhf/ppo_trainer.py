"""The PPO step on one shared base: policy, value, reference and reward all run on the same loaded weights.

- policy    = LoRA adapter "policy" on the base (trained)
- value     = `ValueHead`, a zero-initialised fp32 linear layer on the policy's last hidden state (trained)
- reference = the same base with adapters disabled (no second copy)
- reward    = the reward run's LoRA loaded as adapter "reward" on the same base, plus its score head
              (a separate model only when the reward run was trained on another base)

`PPOTrainer.step` is one PPO step: rollout -> score -> per-token rewards and GAE -> ppo_epochs x shuffled
minibatches. Every formula is a named function in `ppo_math`; this module only moves tensors between
them. `build_trainer` loads it all; `rlhf/ppo.py` turns steps into a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .checkpoint_folders import POLICY_ADAPTER
from .config import Config, PPOConfig, Workspace
from .distributed import SINGLE, Ranks, loss_share
from .errors import ConfigError
from .lora import lora_config
from .models import (adapter_active, eos_token_ids, load_causal_lm, load_tokenizer, pick_device,
                     safetensors_adapter)
from .ppo_math import (ClassicKLController, FixedKLController, LogKLController, apply_no_eos_penalty,
                       chunked_token_logprobs_and_entropy, clip_scores, clipped_policy_loss, clipped_value_loss,
                       explained_variance, gae, grpo_advantages, kl_k3, masked_mean, masked_sequence_mean,
                       masked_sum, masked_whiten, per_token_rewards, policy_moved_too_far, response_mask,
                       rloo_advantages, standard_error)
from .reward_model import RewardHead, RewardScorer, load_reward_onto, read_reward_meta, reward_tokenizer_matches
from .tokens import decoder_hidden_states, pad_left

REWARD_ADAPTER = "reward"
REFERENCE_ADAPTER = "reference"  # the frozen SFT adapter, when PPO starts from one
SAMPLES_PER_STEP = 4
# Logits per chunk while turning hidden states into log-probs: at least 2**23 (fewer than 2**24), whatever the
# vocabulary; a 151k vocabulary gets 56-111 positions per chunk. Not smaller: glibc serves fp32 tensors under
# 32 MiB from its heap once its mmap threshold has risen, and a run of such chunks left a 151k-vocabulary
# step holding 2.5 GB of freed memory; from 32 MiB up each tensor is mmapped and returned when freed.
LOGIT_CHUNK_ELEMENTS = 2**23


class NonFiniteError(Exception):
    """A loss or reward turned NaN/inf: the step cannot be trusted."""


# -- models ------------------------------------------------------------------------------------

class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state; fp32 and zero-initialised (N-details)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def response_forward(model: PeftModel, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """Last hidden states [B, R, H] at the positions that predict each response token.

    One decoder pass without the LM head (`response_logprobs` applies it in chunks). Whichever adapter is
    active (or none, inside `disable_adapter()`) is the model that runs.
    """
    return decoder_hidden_states(model, input_ids, attention_mask)[:, prompt_len - 1:-1]


def response_logprobs(model: PeftModel, hidden: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens and next-token entropies ([B, R] each) from `response_forward`'s
    hidden states, holding the logits of one chunk of LOGIT_CHUNK_ELEMENTS to twice that at a time.

    The model's own output module runs (quantized, tied or LoRA-wrapped alike), followed by its final-logit
    soft-capping (Gemma 2) when the config has one: the distribution `generate` samples from.
    """
    lm = model.get_base_model()
    text_config = lm.config.get_text_config()
    return chunked_token_logprobs_and_entropy(
        hidden, lm.get_output_embeddings(), tokens, temperature, -(-LOGIT_CHUNK_ELEMENTS // text_config.vocab_size),
        softcap=getattr(text_config, "final_logit_softcapping", None))


class RolloutScorer(Protocol):
    def score(self, rollout: "Rollout") -> Tensor:
        """Standardised reward-model score per response ([B])."""


class SharedBaseReward:
    """The reward run's adapter and score head on the policy's own base, scoring the sampled token ids."""

    def __init__(self, model: PeftModel, head: RewardHead) -> None:
        self.model, self.head = model, head

    def score(self, rollout: "Rollout") -> Tensor:
        # The reward model was trained on answers without their EOS: the last real token is the answer's.
        mask = torch.cat([rollout.attention_mask[:, :rollout.prompt_len], rollout.answer_mask.long()], dim=1)
        return self.head.score(self.model, rollout.input_ids, mask)


class SeparateReward:
    """A reward model on another base or tokenizer: it reads the answers' text, tokenized its own way."""

    def __init__(self, scorer: RewardScorer) -> None:
        self.scorer = scorer

    def score(self, rollout: "Rollout") -> Tensor:
        scores = self.scorer.score_many([(prompt.text, text) for prompt, text in zip(rollout.prompts,
                                                                                   rollout.response_texts)],
                                        [prompt.messages for prompt in rollout.prompts])
        return torch.tensor(scores, device=rollout.input_ids.device)


# -- prompts and rollouts ----------------------------------------------------------------------

@dataclass
class PreparedPrompt:
    id: int
    text: str
    messages: list[dict[str, str]] | None
    token_ids: list[int]


@dataclass
class Rollout:
    """Sampled responses: left-padded prompts followed by responses cut after their first EOS."""

    prompts: list[PreparedPrompt]
    input_ids: Tensor        # [B, P + R]
    attention_mask: Tensor   # [B, P + R]; 0 on prompt padding and after each response's EOS
    prompt_len: int          # P
    response_mask: Tensor    # [B, R] bool: real response tokens, EOS included
    answer_mask: Tensor      # [B, R] bool: the answer's tokens, EOS excluded (what the reward model reads)
    response_texts: list[str]

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    @property
    def has_eos(self) -> Tensor:
        return (self.response_mask & ~self.answer_mask).any(dim=1)


@dataclass
class Scored:
    """The no-grad passes over a rollout: policy (old log-probs, values, entropy), reference, reward."""

    logp: Tensor
    values: Tensor | None  # None without a value head (rloo, grpo)
    entropy: Tensor
    ref_logp: Tensor
    scores: Tensor
    score_clipped: Tensor  # share of the reward model's scores that ppo.score_clip cut


# -- the PPO step ------------------------------------------------------------------------------

def check_settings(cfg: PPOConfig, processes: int = 1) -> None:
    """The checks that span several [ppo] keys (each key's own range is checked by `Config`), and the batch's
    split over `processes` data-parallel ranks (each samples whole prompts)."""
    if cfg.batch_size % processes:
        raise ConfigError(f"ppo.batch_size ({cfg.batch_size}) must be divisible by --processes ({processes}): each "
                          "process samples an equal share of the prompts")
    per_update = cfg.minibatches * cfg.grad_accum
    if (responses_per_step(cfg) // processes) % per_update:
        if processes > 1:
            raise ConfigError(f"each process's share of the responses ({responses_per_step(cfg) // processes}) must "
                              f"be divisible by ppo.minibatches x ppo.grad_accum ({cfg.minibatches} x "
                              f"{cfg.grad_accum})")
        k = f" x ppo.samples_per_prompt ({cfg.samples_per_prompt})" if cfg.algorithm != "ppo" else ""
        raise ConfigError(f"ppo.batch_size ({cfg.batch_size}){k} must be divisible by ppo.minibatches x "
                          f"ppo.grad_accum ({cfg.minibatches} x {cfg.grad_accum})")
    if cfg.kl_coef_min > cfg.kl_coef_max:
        raise ConfigError(f"ppo.kl_coef_min ({cfg.kl_coef_min}) must be <= ppo.kl_coef_max ({cfg.kl_coef_max})")


def samples_per_prompt(cfg: PPOConfig) -> int:
    """Responses sampled per prompt: ppo.samples_per_prompt for the critic-free algorithms, one for PPO."""
    return 1 if cfg.algorithm == "ppo" else cfg.samples_per_prompt


def responses_per_step(cfg: PPOConfig) -> int:
    return cfg.batch_size * samples_per_prompt(cfg)


def kl_controller(cfg: PPOConfig) -> FixedKLController:
    """The controller of the KL coefficient beta that ppo.kl_controller names."""
    if cfg.kl_controller == "log":
        return LogKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_gain, cfg.kl_coef_min, cfg.kl_coef_max)
    if cfg.kl_controller == "classic":
        return ClassicKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.init_kl_coef)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so phase timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PPOTrainer:
    """Steps of ppo.algorithm on a policy PeftModel (and, for PPO, a value head), scoring with a reference and a
    reward: PPO (GAE on the value head), RLOO or GRPO (advantages from the k samples of each prompt).

    On data-parallel `ranks` each rank steps on its share of the prompts: advantages are whitened with every
    rank's moments, each minibatch's gradients are summed over the ranks weighted by their share of its loss's
    normaliser (response tokens; responses for GRPO's per-sequence loss), the early stop and the metrics (so the
    KL controller) are the global batch's (rlhf/distributed.py)."""

    def __init__(self, model: PeftModel, value_head: ValueHead | None, reward: RolloutScorer,
                 tokenizer: PreTrainedTokenizerBase, cfg: PPOConfig, ranks: Ranks = SINGLE) -> None:
        check_settings(cfg, ranks.world)
        self.model, self.value_head, self.reward, self.tokenizer, self.cfg = model, value_head, reward, tokenizer, cfg
        self.ranks = ranks
        self.device = model.get_base_model().device
        self.params = [p for p in model.parameters() if p.requires_grad] + (
            list(value_head.parameters()) if value_head is not None else [])
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, eps=cfg.adam_eps)
        self.kl_ctl = kl_controller(cfg)
        model.eval()  # and so it stays: `train` switches to training mode and back
        lm = model.get_base_model()
        self.eos_ids = eos_token_ids(lm, tokenizer)
        # Our own config replaces the checkpoint's (which may carry top_p 0.9 and the like): the rollout must
        # sample exactly softmax(logits / T), the distribution the log-probs are computed from.
        lm.generation_config = GenerationConfig(
            do_sample=True, top_k=0, top_p=1.0, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=self.eos_ids)

    @torch.no_grad()
    def rollout(self, prompts: list[PreparedPrompt]) -> Rollout:
        """Sample one response per prompt from the policy; tokens after the first EOS become padding."""
        prompt_ids, prompt_mask = pad_left([p.token_ids for p in prompts], self.tokenizer.pad_token_id, self.device)
        sequences = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask)
        prompt_len = prompt_ids.shape[1]
        responses = sequences[:, prompt_len:]
        mask = response_mask(responses, self.eos_ids)
        responses = torch.where(mask, responses, self.tokenizer.pad_token_id)
        answer_mask = mask & ~torch.isin(responses, torch.tensor(self.eos_ids, device=self.device))
        return Rollout(
            prompts=prompts, input_ids=torch.cat([prompt_ids, responses], dim=1),
            attention_mask=torch.cat([prompt_mask, mask.long()], dim=1), prompt_len=prompt_len,
            response_mask=mask, answer_mask=answer_mask,
            response_texts=self.tokenizer.batch_decode(responses, skip_special_tokens=True))

    def reference_model(self) -> Any:
        """Context in which the model is the KL reference: the frozen SFT adapter when PPO started from one
        (adapters off would give the base, not the SFT model), else the base with adapters disabled."""
        if REFERENCE_ADAPTER in self.model.peft_config:
            return adapter_active(self.model, REFERENCE_ADAPTER)
        return self.model.disable_adapter()

    @torch.no_grad()
    def score(self, rollout: Rollout) -> Scored:
        """Old log-probs, values and entropy from the policy; reference log-probs; reward scores."""
        temperature, tokens = self.cfg.temperature, rollout.response_ids
        hidden = response_forward(self.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
        logp, entropy = response_logprobs(self.model, hidden, tokens, temperature)
        values = self.value_head(hidden) if self.value_head is not None else None
        with self.reference_model():
            ref_hidden = response_forward(self.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
            ref_logp, _ = response_logprobs(self.model, ref_hidden, tokens, temperature)
        scores, clipped = clip_scores(self.reward.score(rollout).float(), self.cfg.score_clip)
        scores = apply_no_eos_penalty(scores, rollout.has_eos, self.cfg.no_eos_penalty)
        return Scored(logp=logp, values=values, entropy=entropy, ref_logp=ref_logp, scores=scores,
                      score_clipped=clipped)

    def train(self, rollout: Rollout, scored: Scored, advantages: Tensor, returns: Tensor | None) -> dict[str, float]:
        """ppo_epochs x shuffled minibatches (each split into grad_accum micro-batches); mean stats."""
        cfg, batch_size = self.cfg, rollout.input_ids.shape[0]
        minibatch_size = batch_size // cfg.minibatches
        micro_size = minibatch_size // cfg.grad_accum
        stats: dict[str, list[Tensor]] = {}  # metric name -> its value in each micro-batch
        updates, stopped_early = 0, False
        self.model.train()
        try:
            for _ in range(cfg.ppo_epochs):
                for minibatch in torch.randperm(batch_size, device=self.device).split(minibatch_size):
                    self.optimizer.zero_grad(set_to_none=True)
                    for rows in minibatch.split(micro_size):
                        self._backward(rollout, scored, advantages, returns, rows, stats)
                    moved = stats["approx_kl"][-cfg.grad_accum:]  # this minibatch's, before its update
                    moved_kl = self.ranks.mean_metrics({"kl": torch.stack(moved).mean().item()})["kl"]
                    if cfg.max_policy_kl_per_step and policy_moved_too_far(moved_kl, cfg.max_policy_kl_per_step):
                        stopped_early = True  # this minibatch's update and the step's remaining epochs are skipped
                        break
                    self.ranks.sum_gradients(self.params, self._gradient_share(rollout, minibatch))
                    nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                    updates += 1
                if stopped_early:
                    break
        finally:
            self.model.eval()
        return {**{name: torch.stack(values).mean().item() for name, values in stats.items()},
                "epochs_done": updates / cfg.minibatches, "early_stopped": float(stopped_early)}

    def _gradient_share(self, rollout: Rollout, rows: Tensor) -> float:
        """This rank's weight on its minibatch gradient: its share of the loss's normaliser over all ranks (response
        tokens; responses for GRPO, whose policy and KL losses average over sequences)."""
        local = float(len(rows)) if self.cfg.algorithm == "grpo" else rollout.response_mask[rows].sum().item()
        return loss_share(local, self.ranks.sum([local])[0])

    def _backward(self, rollout: Rollout, scored: Scored, advantages: Tensor, returns: Tensor | None, rows: Tensor,
                  stats: dict[str, list[Tensor]]) -> None:
        cfg, mask = self.cfg, rollout.response_mask[rows]
        hidden = response_forward(self.model, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_len)
        logp, entropy = response_logprobs(self.model, hidden, rollout.response_ids[rows], cfg.temperature)
        policy_loss, policy_clipfrac, approx_kl = clipped_policy_loss(
            logp, scored.logp[rows], advantages[rows], mask, cfg.cliprange, per_sequence=cfg.algorithm == "grpo")
        terms = {"policy_loss": policy_loss, "policy_clipfrac": policy_clipfrac, "approx_kl": approx_kl}
        loss = policy_loss
        if self.value_head is not None:
            terms["value_loss"], terms["value_clipfrac"] = clipped_value_loss(
                self.value_head(hidden), scored.values[rows], returns[rows], mask, cfg.cliprange_value)
            loss = loss + cfg.vf_coef * terms["value_loss"]
        if cfg.algorithm == "grpo":  # the KL to the reference is a loss term here, not part of the reward
            terms["kl_loss"] = masked_sequence_mean(kl_k3(logp, scored.ref_logp[rows]), mask)
            loss = loss + self.kl_ctl.value * terms["kl_loss"]
        if cfg.ent_coef:
            loss = loss - cfg.ent_coef * masked_mean(entropy, mask)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the {cfg.algorithm.upper()} loss is {loss.item()} ("
                                 + ", ".join(f"{name} {value.item():.4g}" for name, value in terms.items()) + ")")
        (loss / cfg.grad_accum).backward()
        for name, value in terms.items():
            stats.setdefault(name, []).append(value.detach())

    def advantages(self, scored: Scored, rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """(per-token advantages, returns): PPO's whitened GAE on the value head; for RLOO and GRPO each
        response's sequence advantage among its prompt's k samples on all its tokens, and no returns."""
        cfg = self.cfg
        if cfg.algorithm == "ppo":
            advantages, returns = gae(rewards, scored.values, mask, cfg.gamma, cfg.lam)
            return masked_whiten(advantages, mask, moments=self.ranks.masked_moments(advantages, mask)), returns
        # Rows are grouped by prompt (k consecutive samples each); GRPO's rewards hold no KL, only the score.
        sequence_rewards = masked_sum(rewards, mask, dim=1).view(-1, samples_per_prompt(cfg))
        per_response = (rloo_advantages if cfg.algorithm == "rloo" else grpo_advantages)(sequence_rewards)
        return torch.where(mask, per_response.reshape(-1, 1), 0.0), None

    def step(self, prompts: list[PreparedPrompt]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One step on these prompts (each sampled `samples_per_prompt` times). Returns (metrics, sample rows);
        updates the KL controller."""
        cfg, started = self.cfg, time.perf_counter()
        prompts = [prompt for prompt in prompts for _ in range(samples_per_prompt(cfg))]
        rollout = self.rollout(prompts)
        _sync(self.device)
        rolled_out = time.perf_counter()
        scored = self.score(rollout)
        _sync(self.device)
        scored_at = time.perf_counter()

        mask, kl_coef = rollout.response_mask, self.kl_ctl.value
        rewards, kl = per_token_rewards(scored.scores, scored.logp, scored.ref_logp, mask,
                                        0.0 if cfg.algorithm == "grpo" else kl_coef)
        if not torch.isfinite(rewards).all():
            raise NonFiniteError("the rewards contain NaN/inf (reward model scores or log-probs)")
        advantages, returns = self.advantages(scored, rewards, mask)
        train_stats = self.train(rollout, scored, advantages, returns)
        _sync(self.device)
        finished = time.perf_counter()

        kl_per_response = masked_sum(kl, mask, dim=1)
        lengths = mask.sum(dim=1).float()
        metrics = {
            "score_mean": scored.scores.mean().item(),
            "score_std": scored.scores.std().item() if len(prompts) > 1 else 0.0,
            "score_clipped": scored.score_clipped.item(),
            "rlhf_reward": masked_sum(rewards, mask, dim=1).mean().item(),
            "kl_k1": kl_per_response.mean().item(),
            "kl_k1_sem": standard_error(kl_per_response),
            "kl_k3": masked_sum(kl_k3(scored.logp, scored.ref_logp), mask, dim=1).mean().item(),
            "kl_coef": kl_coef,
            "entropy": masked_mean(scored.entropy, mask).item(),
            **train_stats,
            **({"explained_variance": explained_variance(scored.values, returns, mask).item()}
               if returns is not None else {}),
            "response_length": lengths.mean().item(),
            "eos_rate": rollout.has_eos.float().mean().item(),
            "time_rollout": rolled_out - started,
            "time_score": scored_at - rolled_out,
            "time_train": finished - scored_at,
            "tokens_per_s": lengths.sum().item() / (finished - started),  # response tokens per second of step
        }
        self.ranks.check_identical(self.params)
        metrics = self.ranks.mean_metrics(metrics)  # the global batch's: every rank's KL controller moves alike
        self.kl_ctl.update(metrics["kl_k1"], len(prompts) * self.ranks.world)
        samples = [{"prompt_id": p.id, "prompt": p.text, "response": text, "score": score, "kl": sample_kl}
                   for p, text, score, sample_kl in zip(prompts, rollout.response_texts, scored.scores.tolist(),
                                                        kl_per_response.tolist())][:SAMPLES_PER_STEP]
        return metrics, samples


# -- loading -----------------------------------------------------------------------------------

def build_trainer(workspace: Workspace, cfg: Config, reward_run: str, checkpoint: Path | None = None,
                  ranks: Ranks = SINGLE) -> PPOTrainer:
    """Load the base once, add the policy LoRA (fresh, or from a checkpoint), the value head and the reward; on
    data-parallel `ranks`, rank 0's trainable weights on every rank.

    The reward shares the base when the reward run was trained on the same model, quantization and
    tokenizer; otherwise it is loaded as a separate model.
    """
    device = pick_device()
    torch.manual_seed(cfg.ppo.seed)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    base = load_causal_lm(cfg.model.name, cfg.model.quantization, trust_remote_code=cfg.model.trust_remote_code,
                          device=device)
    if cfg.ppo.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sft = safetensors_adapter(cfg.ppo.sft_adapter) if cfg.ppo.sft_adapter else ""
    if checkpoint is not None or sft:
        start = safetensors_adapter(checkpoint / POLICY_ADAPTER) if checkpoint is not None else sft
        model = PeftModel.from_pretrained(base, start, adapter_name=POLICY_ADAPTER, is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(base, cfg.ppo.lora_r, cfg.ppo.lora_alpha, 0.0),
                               adapter_name=POLICY_ADAPTER)
    if sft:
        model.load_adapter(sft, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter(POLICY_ADAPTER)
    reward = load_reward(workspace, cfg, model, tokenizer, reward_run)
    value_head = ValueHead(base.get_output_embeddings().in_features).to(device) if cfg.ppo.algorithm == "ppo" else None
    trainer = PPOTrainer(model, value_head, reward, tokenizer, cfg.ppo, ranks)
    ranks.broadcast_parameters(trainer.params)
    return trainer


def load_reward(workspace: Workspace, cfg: Config, model: PeftModel, tokenizer: PreTrainedTokenizerBase,
                reward_run: str, adapter_name: str = REWARD_ADAPTER) -> RolloutScorer:
    """The scorer of a reward run for PPO on `model`: its LoRA as adapter `adapter_name` on the policy's own base
    when it was trained on the same model, quantization and tokenizer, else a separate model."""
    reward_dir = workspace.run_dir(reward_run)
    meta = read_reward_meta(reward_dir)
    same_base = (meta["base_model"] == cfg.model.name and meta["quantization"] == cfg.model.quantization
                 and reward_tokenizer_matches(reward_dir, tokenizer))
    if same_base:
        return SharedBaseReward(model, load_reward_onto(model, reward_dir, adapter_name))
    return SeparateReward(RewardScorer.from_run(workspace, reward_run, cfg, device=model.get_base_model().device))
