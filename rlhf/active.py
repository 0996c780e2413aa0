"""Which labeling pairs to serve, and the reward model's view of each: active selection and repeated pairs.

With `[label] selection = "uncertain"` the engine samples `[label] candidates` pairs (for as many prompts)
per pair it serves and serves the one the reward model is least sure about (`pair_uncertainty`): the
smallest score margin, or, with `[label] uncertainty_runs = 2`, also where the two newest reward runs
disagree. Cost: `candidates` generations per pair served instead of one (the rest stay stored, unlabeled);
scoring is one forward pass per answer. With `[label] repeat_every = N`, every Nth pair served is one the
person already labeled, sides swapped (`is_repeat_turn`), for self-consistency.

`PairJudge` scores served pairs with finished reward runs, on the labeling model's own base (the reward
LoRA as a second adapter, as PPO does) when the run was trained on it, else on a base of its own. Pairs sampled
from a PPO run's live policy are judged by the run's own reward instead (`run_reward_judge`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import Config, Workspace
from .errors import RlhfError
from .lora import lora_config
from .ppo_trainer import SeparateReward, SharedBaseReward
from .reward_model import (RewardHead, RewardScorer, encode_response, load_reward_onto, read_reward_meta,
                           reward_tokenizer_matches)
from .store import Store
from .tokens import pad_left

BASE_ADAPTER = "labeling-base"  # the do-nothing adapter a plain labeling base gets to carry the reward adapters
JUDGE_ADAPTER = "judge-"  # + index: the reward runs' adapters on the labeling model

def pair_uncertainty(margins: list[float]) -> float:
    """How unsure a committee of reward models is about a pair, from each one's score margin (score of side A
    minus side B): half the spread of the margins minus the absolute mean margin. One model: -|margin| (a
    small margin is unsure); two that disagree on the side (margins 1 and -1) score 1 - 0 = 1, two that agree
    firmly (2 and 1) score 0.5 - 1.5 = -1. Higher is less sure."""
    if not margins:
        raise ValueError("a pair needs at least one reward model's margin")
    mean = sum(margins) / len(margins)
    return (max(margins) - min(margins)) / 2 - abs(mean)


def least_sure(committee_margins: list[list[float]]) -> int:
    """The index of the candidate pair with the highest `pair_uncertainty` (the first on a tie)."""
    if not committee_margins:
        raise ValueError("no candidate pairs")
    uncertainties = [pair_uncertainty(margins) for margins in committee_margins]
    return uncertainties.index(max(uncertainties))


def is_repeat_turn(served_before: int, every: int) -> bool:
    """Whether the next pair (after `served_before` served ones) is a repeat: the Nth, 2Nth, ... with N =
    `every`; never when every is 0."""
    return every > 0 and (served_before + 1) % every == 0


def selection_provenance(cfg: Config, reward_runs: list[str]) -> dict[str, Any]:
    """What a served answer's provenance says about how its pair was chosen (stored in its `sampling`)."""
    return {"selection": "uncertain", "candidates": cfg.label.candidates, "reward_runs": reward_runs}


@dataclass
class _Judge:
    """One reward run, scoring on the labeling model's base (`head`) or on a base of its own (`scorer`)."""

    run_id: str
    max_length: int
    head: RewardHead | None = None
    scorer: RewardScorer | None = None


class Judges:
    """Reward runs that score labeling pairs (`judges`, newest first; the `head` ones on `model`'s base), on the
    standardised scale PPO reads them on. Pairs are sampled with `sampling()` around the generation."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, judges: list[_Judge] | None = None,
                 model: Any = None) -> None:
        self.tokenizer, self.judges, self._model = tokenizer, judges or [], model

    @property
    def run_ids(self) -> list[str]:
        return [judge.run_id for judge in self.judges]

    def sampling(self) -> AbstractContextManager[Any]:
        return nullcontext()

    @torch.no_grad()
    def score(self, prompt: str, messages: list[dict[str, str]] | None, answers: list[str]) -> list[list[float]]:
        """Each judge's standardised scores of the answers, newest run first."""
        scores = []
        for judge in self.judges:
            if judge.scorer is not None:
                scores.append(judge.scorer.score_many([(prompt, a) for a in answers], [messages] * len(answers)))
                continue
            seqs = [encode_response(self.tokenizer, prompt, a, judge.max_length, messages)[0] for a in answers]
            ids, mask = pad_left(seqs, self.tokenizer.pad_token_id, self._model.device)
            scores.append(judge.head.score(self._model, ids, mask).tolist())
        return scores


def run_reward_judge(workspace: Workspace, reward_run: str, reward: SharedBaseReward | SeparateReward,
                     tokenizer: PreTrainedTokenizerBase) -> Judges:
    """The judge of pairs sampled from a PPO run's live policy: the reward scoring the run's steps (`reward_run`,
    PPO's scorer `reward`), on the policy's own model when it shares its base, so no second copy is loaded.
    `RewardHead.score` runs without grads and puts the active adapter and train modes back: the run is untouched."""
    max_length = read_reward_meta(workspace.run_dir(reward_run))["max_length"]
    if isinstance(reward, SharedBaseReward):
        return Judges(tokenizer, [_Judge(reward_run, max_length, head=reward.head)], reward.model)
    return Judges(tokenizer, [_Judge(reward_run, max_length, scorer=reward.scorer)])


class PairJudge(Judges):
    """Scores labeling pairs with the newest finished reward runs (up to `count`), newest first.

    `attach(model)` returns the model the labeling sampler should use from then on: the same PeftModel with
    the reward adapters added (the policy adapter stays the active one), or the plain base wrapped as one
    (then `sampling()` turns the adapters off while it generates, so answers still come from the base).
    Call it again whenever the labeling model changes; the worker unloads every adapter before it swaps in a
    new policy adapter.
    """

    def __init__(self, workspace: Workspace, cfg: Config, tokenizer: PreTrainedTokenizerBase, model_name: str,
                 count: int) -> None:
        super().__init__(tokenizer)
        self.workspace, self.cfg = workspace, cfg
        self.model_name, self.count = model_name, count
        self.problems: list[str] = []
        self._runs: list[str] = []
        self._wrapped_base = False

    def newest_runs(self, store: Store) -> list[str]:
        return [run.id for run in store.finished_reward_runs()][:self.count]

    def attach(self, model: PreTrainedModel | PeftModel, store: Store) -> PreTrainedModel | PeftModel:
        """Load the newest reward runs for `model` (nothing to do when both are unchanged). A run that cannot be
        loaded (files gone or damaged, its base not available) judges nothing: `problems` says why after the call
        that found it, in one line each, and labeling goes on."""
        runs = self.newest_runs(store)
        if model is self._model and runs == self._runs:
            self.problems = []  # said when they were found
            return model
        if isinstance(model, PeftModel):  # a newer reward run replaces the judges loaded before
            for name in [name for name in model.peft_config if name.startswith(JUDGE_ADAPTER)]:
                model.delete_adapter(name)
        self.judges, self.problems, self._runs = [], [], runs
        self._wrapped_base = model is self._model and self._wrapped_base
        for run_id in runs:
            try:
                model = self._add_judge(model, run_id)
            except (RlhfError, OSError, KeyError, ValueError) as exc:
                self.problems.append(f"reward run {run_id} does not judge labeling pairs: {exc}")
        self._model = model
        return model

    def _add_judge(self, model: PreTrainedModel | PeftModel, run_id: str) -> PreTrainedModel | PeftModel:
        run_dir = self.workspace.run_dir(run_id)
        meta = read_reward_meta(run_dir)
        shared = (meta["base_model"] == self.model_name and meta["quantization"] == self.cfg.model.quantization
                  and reward_tokenizer_matches(run_dir, self.tokenizer))
        if not shared:
            scorer = RewardScorer.from_run(self.workspace, run_id, self.cfg, device=model.device)
            self.judges.append(_Judge(run_id, meta["max_length"], scorer=scorer))
            return model
        if not isinstance(model, PeftModel):
            # A PeftModel to hold the reward adapters, whose active adapter changes nothing (LoRA B starts at 0);
            # `sampling()` turns adapters off while generating anyway, which also skips its cost.
            model = get_peft_model(model, lora_config(model, 1, 1, 0.0), adapter_name=BASE_ADAPTER).eval()
            self._wrapped_base = True
        head = load_reward_onto(model, run_dir, f"{JUDGE_ADAPTER}{len(self.judges)}")
        self.judges.append(_Judge(run_id, meta["max_length"], head=head))
        return model

    def sampling(self) -> AbstractContextManager[Any]:
        """Wrap labeling generation: turns the reward adapters off when the labeling model is the plain base."""
        return self._model.disable_adapter() if self._wrapped_base else nullcontext()
