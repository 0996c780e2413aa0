"""Reward-model training: a LoRA Bradley-Terry reward model on the workspace's preference pairs.

`train_reward` loads the base, adds the LoRA and a fresh score head, and trains them on the pairs
(`reward_pairs`) with the Bradley-Terry loss (`bradley_terry`); its `RunSession` keeps the run row,
metrics and checkpoints. The finished model is saved in the format `reward_model` reads and scores with.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .bradley_terry import batch_metrics, bradley_terry_loss, pairwise_accuracy, reward_loss
from .checkpoints import (CheckpointWriteError, config_of_run, load_training_state, resumable_run, resume_checkpoint,
                          save_training_state)
from .config import Config, Workspace
from .distributed import SINGLE, Ranks, loss_share
from .errors import RlhfError
from .hooks import RunHooks, RunResult
from .locks import run_lock
from .lora import lora_config
from .models import load_causal_lm, load_tokenizer, resolve_model_name, safetensors_adapter, tokenizer_fingerprint
from .quantization import unquantized_warning
from .reward_model import (ADAPTER_SUBDIR, META_FORMAT, REWARD_SUBDIR, SCORE_HEAD_FILE, raw_scores,
                           save_reward_model)
from .reward_pairs import (EncodedPair, data_hash, encode_pairs, pairs_of_run, split_heldout, usable_pairs,
                           write_pairs_record)
from .run_rows import RunStatus
from .runs import RunSession, open_store
from .store import Store, new_run_id
from .tokens import model_device, pad_left

MAX_GRAD_NORM = 1.0  # trl's default; keeps one odd batch from throwing the LoRA far off
STD_FLOOR = 1e-6
STATE_KEYS = ("step", "heldout_acc", "seconds")  # what a reward checkpoint's state.json holds


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



def _lora_model(base: PreTrainedModel, cfg: Config, adapter: Path | None = None) -> PeftModel:
    """The trainable reward LoRA on `base`: fresh, or the one saved in `adapter` (a resumed run)."""
    if cfg.reward_quantization != "none":
        # Casts norms to fp32 and lets gradients reach the LoRA through frozen quantized layers.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if adapter is not None:
        return PeftModel.from_pretrained(base, safetensors_adapter(adapter), is_trainable=True)
    return get_peft_model(base, lora_config(base, cfg.reward.lora_r, cfg.reward.lora_alpha, cfg.reward.lora_dropout))



def train_reward(workspace: Workspace, cfg: Config, *, hooks: RunHooks | None = None,
                 store: Store | None = None, resume_run: str | None = None, ranks: Ranks = SINGLE) -> RunResult:
    """Train a LoRA Bradley-Terry reward model on the workspace's preference pairs (on data-parallel `ranks`, each
    rank on its share of every batch, rank 0 writing: rlhf/distributed.py).

    Writes a `runs` row (kind "reward") and its metrics as training goes, and a resumable checkpoint
    every [reward] checkpoint_every steps, after each epoch and on stop. Saves the adapter, score head
    and reward.json under runs/<run_id>/reward/ when it finishes, and also when stopped (status
    "stopped") or on a non-finite loss (status "failed", the weights from before that step).

    `resume_run` continues a stopped, failed or interrupted reward run from its last checkpoint, with the
    config and the preference pairs it started with.
    """
    hooks = hooks or RunHooks()
    with open_store(workspace, store) as db:
        if resume_run is None:
            return _train(workspace, cfg, hooks, db, resume_run, ranks)
        db.run(resume_run)  # an unknown id says so before any folder is made for its lock
        with run_lock(workspace.run_dir(resume_run), resume_run) if ranks.writes else nullcontext():
            return _train(workspace, cfg, hooks, db, resume_run, ranks)


def _train(workspace: Workspace, cfg: Config, hooks: RunHooks, store: Store, resume_run: str | None,
           ranks: Ranks) -> RunResult:
    resumed = resumable_run(store, resume_run, "reward") if resume_run is not None else None
    if resumed is not None:
        cfg = config_of_run(resumed, cfg)
    rc = cfg.reward
    policy_base = resolve_model_name(cfg)
    base_name = rc.base or policy_base
    pairs, identical = usable_pairs(store, cfg)
    start_step, checkpoint, unused = 0, None, 0
    if resumed is not None:
        pairs, identical, unused = pairs_of_run(workspace.run_dir(resumed.id), pairs, resumed.id)
        start_step, checkpoint = resume_checkpoint(workspace, resumed, adapter=ADAPTER_SUBDIR,
                                                   tensor_files=(SCORE_HEAD_FILE,), state_keys=STATE_KEYS)
    tokenizer = load_tokenizer(base_name, trust_remote_code=cfg.model.trust_remote_code)
    _check_tokenizers(base_name, policy_base, tokenizer, cfg.model.trust_remote_code)

    encoded = encode_pairs(pairs, tokenizer, rc.max_length)
    train, heldout = split_heldout(encoded, rc.seed, rc.heldout_fraction)
    if not train:
        raise RlhfError(f"all {len(encoded)} pairs fell in the held-out split: lower [reward] heldout_fraction")
    steps_per_epoch = math.ceil(len(train) / rc.batch_size)
    total_steps = rc.epochs * steps_per_epoch
    torch.manual_seed(rc.seed)
    # Loaded before the run row is written: a model that cannot load leaves no failed run behind.
    base = load_causal_lm(base_name, cfg.reward_quantization, trust_remote_code=cfg.model.trust_remote_code)
    if rc.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ranks.barrier()  # every rank has read the run's row before rank 0 starts or resumes it
    if resumed is None:
        # pairs.json in the run's folder: a resume trains on the same comparisons.
        session = RunSession.start(store, workspace, hooks, "reward", {**cfg.to_dict(), "processes": ranks.world},
                                   total_steps=total_steps,
                                   files=lambda folder: write_pairs_record(folder, pairs, identical),
                                   run_id=ranks.from_rank0(new_run_id("reward")), writes=ranks.writes)
    else:
        session = RunSession.resume(store, workspace, hooks, resumed, start_step, writes=ranks.writes)
    counts = {"pairs": len(pairs), "train": len(train), "heldout": len(heldout),
              "heldout_prompts": len({p.prompt_id for p in heldout}), "ties": sum(p.is_tie for p in encoded),
              "truncated": sum(p.truncated for p in encoded), "identical_skipped": identical}
    if unused:
        session.warn(f"{unused} pairs labeled since this run started are not used by it: train a new reward model "
                     "to include them")
    if counts["truncated"]:
        session.warn(f"{counts['truncated']} of {len(encoded)} pairs were longer than max_length {rc.max_length} "
                     "and were cut from the left of the prompt")
    if not heldout:
        session.warn("no held-out pairs (too few prompts or heldout_fraction 0): held-out accuracy is not measured")
    if cfg.reward_quantization == "4bit" and (gap := unquantized_warning(base)):
        session.warn(gap)
    with session:
        model = _lora_model(base, cfg, checkpoint / ADAPTER_SUBDIR if checkpoint else None)
        device = model_device(model)
        head = nn.Linear(base.config.get_text_config().hidden_size, 1, bias=False, device=device)
        nn.init.normal_(head.weight, std=getattr(base.config, "initializer_range", 0.02))
        trainer = _Trainer(model, head, tokenizer.pad_token_id, cfg, session, device, steps_per_epoch, ranks)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        ranks.broadcast_parameters(trainer.params)
        try:
            status, message = trainer.run(train, heldout)
        except CheckpointWriteError as exc:  # a full disk: the final save would fail the same way
            return session.finish_with_product(None, RunStatus.FAILED, session.checkpoint_failed(exc))
        # Measured by the rank that saves the model.
        mean, std = (_training_response_stats(model, head, train, rc.batch_size, tokenizer.pad_token_id, device)
                     if session.writes else (0.0, 1.0))
        reward_dir = session.run_dir / REWARD_SUBDIR
        meta = {
            "format": META_FORMAT, "run_id": session.run_id, "status": status, "base_model": base_name,
            "quantization": cfg.reward_quantization, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "hidden_size": base.config.get_text_config().hidden_size, "normalisation": {"mean": mean, "std": std},
            "max_length": rc.max_length, "config": cfg.to_dict(), "data_hash": data_hash(pairs), "counts": counts,
            "heldout_acc": trainer.heldout_acc, "steps": session.step,
            "epochs_completed": session.step // steps_per_epoch, "seconds": round(trainer.seconds(), 3),
        }
        if session.writes:
            save_reward_model(reward_dir, model, head, meta)
    if status != RunStatus.FAILED:
        message = _summary(trainer.heldout_acc, counts)
    return session.finish_with_product(reward_dir, status, message)


def _summary(heldout_acc: float | None, counts: dict[str, int]) -> str:
    acc = "not measured" if heldout_acc is None else f"{heldout_acc:.3f}"
    return (f"held-out accuracy {acc} on {counts['heldout']} pairs; trained on {counts['train']} pairs "
            f"({counts['truncated']} truncated)")


class _Trainer:
    """The optimisation loop: one optimizer step per batch, held-out evaluation after each epoch, a
    resumable checkpoint every `checkpoint_every` steps, after each epoch and when it stops early. On data-parallel
    `ranks` each rank scores its share of a batch; only the rank that writes evaluates the held-out pairs."""

    def __init__(self, model: PeftModel, head: nn.Linear, pad_id: int, cfg: Config, session: RunSession,
                 device: torch.device, steps_per_epoch: int, ranks: Ranks = SINGLE) -> None:
        self.model, self.head, self.pad_id, self.rc, self.ranks = model, head, pad_id, cfg.reward, ranks
        self.session, self.device, self.steps_per_epoch = session, device, steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=self.rc.lr, weight_decay=0.0)
        self.heldout_acc: float | None = None
        self._seconds_before = 0.0  # training time of the run's earlier sessions (before a resume)
        self._started = time.monotonic()

    def seconds(self) -> float:
        """Time spent training, over every session of the run."""
        return self._seconds_before + time.monotonic() - self._started

    def _write_checkpoint(self, folder: Path, step: int) -> None:
        self.model.save_pretrained(str(folder / ADAPTER_SUBDIR), safe_serialization=True)
        save_file({"weight": self.head.weight.detach().cpu().contiguous()}, str(folder / SCORE_HEAD_FILE))
        save_training_state(folder, self.optimizer, {"step": step, "heldout_acc": self.heldout_acc,
                                                     "seconds": self.seconds()})

    def restore(self, folder: Path) -> None:
        """Continue from a checkpoint: score head, optimizer, RNGs (the adapter is loaded with the model, the step
        is the session's)."""
        self.head.weight.data.copy_(load_file(str(folder / SCORE_HEAD_FILE))["weight"])
        state = load_training_state(folder, self.optimizer)
        self.heldout_acc, self._seconds_before = state["heldout_acc"], state["seconds"]

    def _log_heldout(self, heldout: list[EncodedPair]) -> None:
        if not self.session.writes:
            return
        r_c, r_r = _evaluate(self.model, self.head, heldout, self.rc.batch_size, self.pad_id, self.device)
        if r_c.numel():
            self.heldout_acc = pairwise_accuracy(r_c, r_r)
            self.session.log({"heldout_acc": self.heldout_acc,
                              "heldout_loss": bradley_terry_loss(r_c, r_r).mean().item()})

    def _train_step(self, pairs: list[EncodedPair]) -> dict[str, float]:
        """One optimizer step on `pairs`: this rank's share of them scored and back-propagated, the gradients summed
        over the ranks weighted by share (the global batch's mean loss); loss and metrics are the global batch's."""
        self.model.train()
        step, local = self.session.step, self.ranks.share(pairs)
        weight = loss_share(len(local), len(pairs))
        r_c = r_r = torch.empty(0, device=self.device)  # a rank left without pairs at an epoch's end adds nothing
        if local:
            batch = _batch(local, self.pad_id, self.device)
            r_c, r_r = _pair_scores(self.model, self.head, batch)
            local_loss = reward_loss(r_c, r_r, margin=batch.margin, is_tie=batch.is_tie,
                                     center_coef=self.rc.center_coef)
        # The loss is a mean over pairs: the global batch's is the ranks' losses weighted by share.
        loss = self.ranks.sum([local_loss.item() * weight if local else 0.0])[0]
        if not math.isfinite(loss):
            raise _Failed(f"loss became {loss} at step {step + 1}; kept the weights from step {step} "
                          "(try a lower [reward] lr)")
        if local:
            local_loss.backward()
        self.ranks.sum_gradients(self.params, weight)
        is_tie = torch.tensor([p.is_tie for p in pairs], dtype=torch.bool, device=self.device)
        r_c, r_r = self.ranks.gather(r_c.detach()), self.ranks.gather(r_r.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise _Failed(f"gradient became {grad_norm.item()} at step {step + 1}; kept the weights from "
                          f"step {step} (try a lower [reward] lr)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ranks.check_identical(self.params)
        return {"loss": loss, "grad_norm": grad_norm.item(), **batch_metrics(r_c, r_r, is_tie)}

    def run(self, train: list[EncodedPair], heldout: list[EncodedPair]) -> tuple[RunStatus, str]:
        """Train from the session's step on. Returns (status, message): finished, stopped (on request) or failed
        (non-finite loss, out of memory); an early end first checkpoints the last good weights."""
        status, message = self._steps(train, heldout)
        if status == RunStatus.STOPPED:
            self.session.stop(self._write_checkpoint)
        elif status == RunStatus.FAILED:
            self.session.save_progress(self._write_checkpoint)
        return status, message

    def _steps(self, train: list[EncodedPair], heldout: list[EncodedPair]) -> tuple[RunStatus, str]:
        session = self.session
        if session.step == 0:
            self._log_heldout(heldout)  # the untrained model: the start of the accuracy curve
        first_epoch, first_batch = divmod(session.step, self.steps_per_epoch)
        for epoch in range(first_epoch, self.rc.epochs):
            # The order is a function of (seed, epoch) alone, so a resumed epoch goes on where it stopped.
            order = list(train)
            random.Random(f"{self.rc.seed}:{epoch}").shuffle(order)
            for batch_index in range(first_batch if epoch == first_epoch else 0, self.steps_per_epoch):
                if session.should_stop():
                    return RunStatus.STOPPED, f"stopped at step {session.step} of {session.total_steps}"
                start = batch_index * self.rc.batch_size
                try:
                    metrics = self._train_step(order[start:start + self.rc.batch_size])
                except _Failed as failure:
                    return RunStatus.FAILED, str(failure)
                except torch.OutOfMemoryError:
                    self.optimizer.zero_grad(set_to_none=True)
                    return RunStatus.FAILED, (
                        f"out of GPU memory at step {session.step + 1}; kept the weights from step {session.step} "
                        f"(lower [reward] batch_size, now {self.rc.batch_size}, or max_length, now "
                        f"{self.rc.max_length}, or set [reward] quantization = \"4bit\" or "
                        "gradient_checkpointing = true)")
                done = min(start + self.rc.batch_size, len(order))
                session.step_done({**metrics, "epoch": epoch + done / len(order)})
                if session.step % self.rc.checkpoint_every == 0 and batch_index < self.steps_per_epoch - 1:
                    session.checkpoint(self._write_checkpoint)
            self._log_heldout(heldout)
            if session.step < session.total_steps:
                # After the held-out evaluation: a resume here starts the next epoch.
                session.checkpoint(self._write_checkpoint)
        return RunStatus.FINISHED, ""
