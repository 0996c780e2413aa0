"""Sampling labeling pairs: two answers to one prompt from the current policy, in one `generate` call.

Labeling samples may use any settings (top-k, top-p, repetition penalty): they are only looked at
and compared, never used for KL, so they need not match the PPO rollout's sampling.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import SamplingConfig
from .models import encode_prompt, eos_token_ids, format_prompt
from .tokens import truncate_left

ANSWERS_PER_PAIR = 2


def generation_seed(base_seed: int, prompt_id: int, draw: int, resample: int = 0) -> int:
    """Seed of one generate call: a 31-bit hash of (config seed, prompt, draw, twin re-sample index).

    `draw` counts the answers already stored for the prompt, so a restarted engine does not repeat
    the pairs it showed before, while the same database and seed reproduce the same samples.
    """
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{draw}:{resample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def cut_at_eos(token_ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """The answer's tokens up to (not including) the first EOS, and whether an EOS was emitted.

    Everything after the first EOS is padding from the batched generate call.
    """
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:i], True
    return token_ids, False


def a_side_first(seed: int, prompt_id: int, first_id: int, second_id: int) -> bool:
    """Blind side assignment: True if the first answer goes on side A, a seeded coin flip per pair."""
    return random.Random(f"{seed}:{prompt_id}:{first_id}:{second_id}").random() < 0.5


def sampling_params(cfg: SamplingConfig) -> dict[str, float | int]:
    """The settings that shaped an answer, stored with it as provenance."""
    keep = ("temperature", "top_k", "top_p", "max_new_tokens", "repetition_penalty")
    return {k: v for k, v in asdict(cfg).items() if k in keep}


@dataclass
class Answer:
    text: str
    tokens: int
    finished: bool  # emitted EOS before max_new_tokens


@dataclass
class SampledPair:
    answers: list[Answer]
    seed: int  # of the generate call that produced these answers
    prompt_tokens: int
    notices: list[str]


class PairSampler:
    """Samples answer pairs from a loaded causal LM (base or base + adapter)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SamplingConfig,
                 max_prompt_tokens: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_prompt_tokens = max_prompt_tokens
        self.eos_ids = set(eos_token_ids(model, tokenizer))

    def sample(self, prompt_text: str, messages: list[dict[str, str]] | None, *, prompt_id: int,
               draw: int) -> SampledPair:
        """Two answers; identical twins are re-sampled up to cfg.max_resample times, then kept with a notice."""
        ids, cut = truncate_left(encode_prompt(self.tokenizer, format_prompt(self.tokenizer, prompt_text, messages)),
                                 self.max_prompt_tokens)
        notices = [f"prompt cut to its last {len(ids)} tokens ({cut} dropped)"] if cut else []
        for resample in range(self.cfg.max_resample + 1):
            seed = generation_seed(self.cfg.seed, prompt_id, draw, resample)
            answers = self._generate(ids, seed)
            if answers[0].text.strip() != answers[1].text.strip():
                break
        else:
            notices.append(f"both answers are identical after {self.cfg.max_resample} re-samples")
        return SampledPair(answers=answers, seed=seed, prompt_tokens=len(ids), notices=notices)

    @torch.inference_mode()
    def _generate(self, prompt_ids: list[int], seed: int) -> list[Answer]:
        torch.manual_seed(seed)
        device = self.model.device
        input_ids = torch.tensor([prompt_ids], device=device)
        output = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
            num_return_sequences=ANSWERS_PER_PAIR, temperature=self.cfg.temperature, top_k=self.cfg.top_k,
            top_p=self.cfg.top_p, repetition_penalty=self.cfg.repetition_penalty,
            max_new_tokens=self.cfg.max_new_tokens, eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id)
        answers = []
        for row in output[:, len(prompt_ids):].tolist():
            tokens, finished = cut_at_eos(row, self.eos_ids)
            answers.append(Answer(self.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), finished))
        return answers
