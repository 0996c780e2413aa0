"""PPO end to end on CPU: a reward model trained on a hidden rule, then PPO raising its score; 4-bit;
stop/resume equal to an uninterrupted run; the lock, guards and CLI.

The policy is a tiny Llama pre-trained for a few seconds on the tiny corpus (a random one samples
near-uniform bytes, too flat for LoRA to move in a few steps). Hidden rule: answers that end with "!"
(about 20% of the corpus sentences) win.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf.cli import main
from rlhf.config import Config, Workspace
from rlhf.errors import RlhfError
from rlhf.models import load_causal_lm
from rlhf.hooks import RunHooks
from rlhf.checkpoints import CHECKPOINTS_DIR
from rlhf.ppo import LOCK_FILE, VALUE_HEAD_FILE, ppo_lock, prepare_prompts, prompt_batch, run_ppo
from rlhf.ppo_trainer import (POLICY_ADAPTER, REFERENCE_ADAPTER, REWARD_ADAPTER, SeparateReward, SharedBaseReward,
                              build_trainer, response_forward, response_logprobs)
from rlhf.ppo_math import logprobs_and_entropy_from_logits
from rlhf.reward import train_reward
from rlhf.reward_model import RewardScorer
from rlhf.store import Store
from tools.tiny import exclamation_rule_workspace, pretrain_tiny_llama

pytestmark = pytest.mark.slow

METRICS = {"score_mean", "score_std", "rlhf_reward", "kl_k1", "kl_k1_sem", "kl_k3", "kl_coef", "entropy",
           "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl", "explained_variance",
           "response_length", "eos_rate", "time_rollout", "time_score", "time_train", "tokens_per_s", "epochs_done",
           "early_stopped", "score_clipped"}
CRITIC_FREE_METRICS = METRICS - {"value_loss", "value_clipfrac", "explained_variance"}
METRICS_OF = {"ppo": METRICS, "rloo": CRITIC_FREE_METRICS, "grpo": CRITIC_FREE_METRICS | {"kl_loss"}}
TIMINGS = {"time_rollout", "time_score", "time_train", "tokens_per_s"}
PPO_SETTINGS = {"ppo.batch_size": 16, "ppo.minibatches": 2, "ppo.ppo_epochs": 4, "ppo.lr": 1e-3,
                "ppo.max_new_tokens": 32, "ppo.checkpoint_every": 2}


@pytest.fixture(scope="module")
def trained_tiny_dir(tmp_path_factory) -> Path:
    """The tiny Llama after 100 steps of language modelling on chat-formatted corpus sentences (~6 s)."""
    return pretrain_tiny_llama(tmp_path_factory.mktemp("trained-tiny"))


@pytest.fixture(scope="module")
def rewarded(tmp_path_factory, trained_tiny_dir) -> tuple[Workspace, str]:
    """A workspace with a finished reward run that learned the hidden rule (held-out accuracy >= 0.8)."""
    ws = exclamation_rule_workspace(tmp_path_factory.mktemp("ppo") / "ws", trained_tiny_dir)
    result = train_reward(ws, ws.load_config())
    assert result.status == "finished", result.message
    with Store(ws.db_path) as store:
        heldout = [m["value"] for m in store.metrics(result.run_id, "heldout_acc")]
    assert heldout[-1] >= 0.8
    return ws, result.run_id


def ppo_config(ws: Workspace, **overrides) -> Config:
    return ws.load_config().override({**PPO_SETTINGS, **overrides})


def metric_rows(ws: Workspace, run_id: str) -> dict[int, dict[str, float]]:
    with Store(ws.db_path) as store:
        return store.metrics_by_step(run_id)


def assert_score_rises(by_step: dict[int, dict[str, float]], margin: float) -> None:
    scores = [by_step[s]["score_mean"] for s in sorted(by_step)]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + margin, f"score did not rise by {margin}: {scores}"
    assert all(math.isfinite(by_step[s]["kl_k1"]) and math.isfinite(by_step[s]["kl_k3"]) for s in by_step)


# -- end to end ----------------------------------------------------------------------------------

def test_ppo_raises_the_reward_model_score(rewarded):
    ws, reward_run = rewarded
    steps = 14
    result = run_ppo(ws, ppo_config(ws, **{"ppo.steps": steps}), reward_run=reward_run)

    assert result.status == "finished" and result.step == steps
    by_step = metric_rows(ws, result.run_id)
    assert sorted(by_step) == list(range(1, steps + 1))
    assert all(set(row) == METRICS for row in by_step.values())
    # Threshold: the mean standardised score of the last 3 steps beats the first 3 by half a reward std.
    assert_score_rises(by_step, margin=0.5)
    # Policy == reference before the first update (LoRA B starts at zero): both KL estimators are 0.
    assert by_step[1]["kl_k1"] == pytest.approx(0.0, abs=1e-5)
    assert by_step[1]["kl_k3"] == pytest.approx(0.0, abs=1e-5)
    assert all(0.0 <= row["eos_rate"] <= 1.0 and 1 <= row["response_length"] <= 32 for row in by_step.values())
    with Store(ws.db_path) as store:
        run = store.run(result.run_id)
        samples = store.samples(result.run_id)
    assert (run.status, run.step, run.checkpoint_step, run.parent_run) == ("finished", steps, steps,
                                                                                       reward_run)
    assert len(samples) == 4 * steps and all(s["response"] is not None and math.isfinite(s["kl"]) for s in samples)
    checkpoints = Path(run.checkpoint).parent
    # Checkpoints every 2 steps: the newest 3 (ppo.keep_checkpoints) are kept, older ones removed.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-10", "step-12", "step-14"]


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_critic_free_algorithms_raise_the_score_without_a_value_head(rewarded, algorithm):
    """RLOO and GRPO: 4 prompts x 4 samples a step, no value head (nothing trained, logged or saved for one)."""
    ws, reward_run = rewarded
    steps = 14
    cfg = ppo_config(ws, **{"ppo.steps": steps, "ppo.algorithm": algorithm, "ppo.batch_size": 4,
                            "ppo.samples_per_prompt": 4})
    result = run_ppo(ws, cfg, reward_run=reward_run)

    assert result.status == "finished" and result.step == steps
    by_step = metric_rows(ws, result.run_id)
    assert all(set(row) == METRICS_OF[algorithm] for row in by_step.values())
    assert_score_rises(by_step, margin=0.5)
    checkpoint = Path(result.checkpoint)
    assert (checkpoint / POLICY_ADAPTER / "adapter_model.safetensors").is_file()
    assert not (checkpoint / VALUE_HEAD_FILE).exists()
    trainer = build_trainer(ws, cfg, reward_run)
    assert trainer.value_head is None and all(".policy." in name for name, p in trainer.model.named_parameters()
                                              if p.requires_grad)


def test_ppo_through_4bit_shares_one_quantized_base(tmp_path, trained_tiny_dir):
    import bitsandbytes as bnb

    ws = exclamation_rule_workspace(tmp_path / "ws4", trained_tiny_dir, quantization="4bit")
    reward = train_reward(ws, ws.load_config())
    assert reward.status == "finished", reward.message

    trainer = build_trainer(ws, ppo_config(ws), reward.run_id)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert isinstance(trainer.reward, SharedBaseReward)
    assert set(trainer.model.peft_config) == {POLICY_ADAPTER, REWARD_ADAPTER}
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(f".{POLICY_ADAPTER}." in name for name in trained)
    assert len(trainer.params) == len(trained) + 2  # + value head weight and bias
    del trainer

    steps = 14
    result = run_ppo(ws, ppo_config(ws, **{"ppo.steps": steps}), reward_run=reward.run_id)
    assert result.status == "finished"
    assert_score_rises(metric_rows(ws, result.run_id), margin=0.5)


def test_rollout_log_probs_match_what_generate_sampled(rewarded):
    """Log-probs from logits / T over the whole sequence equal those of the distribution `generate` sampled."""
    ws, reward_run = rewarded
    trainer = build_trainer(ws, ppo_config(ws, **{"ppo.temperature": 0.7, "ppo.batch_size": 4}), reward_run)
    with Store(ws.db_path) as store:
        prompts, _ = prepare_prompts(store.prompts()[:4], trainer.tokenizer, 64)
    torch.manual_seed(3)
    rollout = trainer.rollout(prompts)
    sampling = trainer.model.generation_config
    assert (sampling.do_sample, sampling.temperature, sampling.top_k, sampling.top_p) == (True, 0.7, 0, 1.0)
    torch.manual_seed(3)
    prompt = slice(0, rollout.prompt_len)
    generated = trainer.model.generate(input_ids=rollout.input_ids[:, prompt],
                                       attention_mask=rollout.attention_mask[:, prompt],
                                       output_logits=True, return_dict_in_generate=True)
    sampled = generated.sequences[:, rollout.prompt_len:]
    mask = rollout.response_mask
    assert torch.equal(torch.where(mask, sampled, 0), torch.where(mask, rollout.response_ids, 0))
    assert not (rollout.response_ids[~mask] != trainer.tokenizer.pad_token_id).any()  # after EOS: padding
    expected, _ = logprobs_and_entropy_from_logits(torch.stack(generated.logits, dim=1), sampled, 0.7)
    with torch.no_grad():
        hidden = response_forward(trainer.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
        ours, _ = response_logprobs(trainer.model, hidden, rollout.response_ids, 0.7)
    assert torch.allclose(ours[mask], expected[mask], atol=1e-4)
    assert all(trainer.tokenizer.eos_token not in text for text in rollout.response_texts)


def tiny_causal_lm(family: str):
    """A random Llama (untied head) or Gemma 2 (tied embeddings, final-logit soft-capping at 0.5: small
    enough to change a random model's log-probs) with 1000 tokens, LoRA on every linear layer; in fp64, so
    that two ways of computing the same numbers agree to rounding."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    torch.manual_seed(0)
    if family == "gemma2":
        base = Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=0.5))
    else:
        base = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    return get_peft_model(base.double(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_response_logprobs_equal_the_models_own_logits_and_gradients(family, monkeypatch):
    """Chunked log-probs and entropies (3-4 positions per chunk here) equal those from the model's full
    forward (`.logits`, soft-capped by transformers for Gemma 2), and so do their gradients to the LoRA."""
    from rlhf import ppo_trainer

    monkeypatch.setattr(ppo_trainer, "LOGIT_CHUNK_ELEMENTS", 3 * 1000)
    model = tiny_causal_lm(family)
    model.train()
    torch.manual_seed(1)
    prompt_len, temperature = 5, 0.8
    input_ids = torch.randint(0, 1000, (2, prompt_len + 7))
    attention_mask = torch.ones_like(input_ids)
    tokens = input_ids[:, prompt_len:]
    lora = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(logp, entropy):
        weights = torch.linspace(-1, 2, logp.numel(), dtype=logp.dtype).view_as(logp)
        return torch.autograd.grad((logp * weights).sum() + 0.3 * entropy.sum(), lora)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, prompt_len - 1:-1]
    expected = logprobs_and_entropy_from_logits(logits, tokens, temperature)
    hidden = response_forward(model, input_ids, attention_mask, prompt_len)
    ours = response_logprobs(model, hidden, tokens, temperature)
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)
    for mine, theirs in zip(loss_and_grads(*ours), loss_and_grads(*expected)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)
    if family == "gemma2":  # the cap matters: the uncapped head is off by far more than the 1e-10 allowed
        uncapped, _ = logprobs_and_entropy_from_logits(model.get_base_model().get_output_embeddings()(hidden), tokens,
                                                       temperature)
        assert (uncapped - expected[0]).abs().max() > 1e-3


def test_ppo_from_an_sft_adapter_keeps_it_frozen_as_the_reference(rewarded, tmp_path):
    """Started from an SFT adapter, the policy begins as that adapter and the reference is that adapter,
    frozen: KL is exactly 0 at the start, where the base with adapters off would not be."""
    ws, reward_run = rewarded
    cfg = ppo_config(ws, **{"ppo.batch_size": 4})
    torch.manual_seed(5)
    sft = get_peft_model(load_causal_lm(cfg.model.name), LoraConfig(r=4, target_modules="all-linear",
                                                                      init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft", safe_serialization=True)
    trainer = build_trainer(ws, cfg.override({"ppo.sft_adapter": str(tmp_path / "sft")}), reward_run)
    with Store(ws.db_path) as store:
        prompts, _ = prepare_prompts(store.prompts()[:4], trainer.tokenizer, 64)
    rollout = trainer.rollout(prompts)
    scored = trainer.score(rollout)
    mask = rollout.response_mask
    assert torch.equal(scored.logp[mask], scored.ref_logp[mask])
    with torch.no_grad(), trainer.model.disable_adapter():
        base_hidden = response_forward(trainer.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
        base_logp, _ = response_logprobs(trainer.model, base_hidden, rollout.response_ids, cfg.ppo.temperature)
    assert (base_logp[mask] - scored.ref_logp[mask]).abs().max() > 1e-3
    reference = [p for name, p in trainer.model.named_parameters() if f".{REFERENCE_ADAPTER}." in name]
    assert reference and not any(p.requires_grad for p in reference)
    assert trainer.model.active_adapter == POLICY_ADAPTER
    with pytest.raises(RlhfError, match="adapter_model.safetensors"):
        build_trainer(ws, cfg.override({"ppo.sft_adapter": str(tmp_path)}), reward_run)


def test_shared_base_reward_scores_like_the_reward_model_on_the_text(rewarded):
    """Scoring the sampled ids on the policy's base (EOS dropped, padded both sides) gives what the
    reward model, loaded on its own, gives for the answer's text: the format it was trained on."""
    ws, reward_run = rewarded
    trainer = build_trainer(ws, ppo_config(ws, **{"ppo.batch_size": 8}), reward_run)
    with Store(ws.db_path) as store:
        prompts, _ = prepare_prompts(store.prompts()[:8], trainer.tokenizer, 64)
    torch.manual_seed(0)
    rollout = trainer.rollout(prompts)
    assert rollout.has_eos.any() and rollout.response_mask.sum(1).unique().numel() > 1  # EOS and padding
    separate = SeparateReward(RewardScorer.from_run(ws, reward_run))
    assert torch.allclose(trainer.reward.score(rollout), separate.score(rollout), atol=1e-4)


def test_gradient_checkpointing_and_accumulation_keep_the_numbers(rewarded):
    """Gradient checkpointing recomputes activations: same step, same numbers. Accumulating two half
    micro-batches moves the weights like one full one (close, not equal: masked means per micro-batch)."""
    ws, reward_run = rewarded
    small = {"ppo.batch_size": 4, "ppo.minibatches": 1, "ppo.ppo_epochs": 2}
    metrics = {}
    for name, extra in {"plain": {}, "checkpointing": {"ppo.gradient_checkpointing": True},
                        "accumulation": {"ppo.grad_accum": 2}}.items():
        trainer = build_trainer(ws, ppo_config(ws, **small, **extra), reward_run)
        with Store(ws.db_path) as store:
            prompts, _ = prepare_prompts(store.prompts()[:4], trainer.tokenizer, 64)
        torch.manual_seed(0)
        metrics[name] = [trainer.step(prompts)[0] for _ in range(2)]
    assert trainer.cfg.grad_accum == 2
    for key in ("policy_loss", "value_loss", "approx_kl", "kl_k1", "score_mean"):
        assert [m[key] for m in metrics["checkpointing"]] == pytest.approx([m[key] for m in metrics["plain"]],
                                                                           rel=1e-4, abs=1e-6), key
    # Step 1 samples the same responses in all three; step 2 samples from the updated policies.
    assert metrics["accumulation"][0]["score_mean"] == metrics["plain"][0]["score_mean"]
    assert metrics["accumulation"][1]["kl_k1"] == pytest.approx(metrics["plain"][1]["kl_k1"], rel=0.2, abs=0.05)


# -- stop and resume -----------------------------------------------------------------------------

class StopAt(RunHooks):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_step(self, run_id, step, metrics):
        if step == self.step:
            self.stop_requested.set()


class CrashAt(RunHooks):
    """Kills the run right after step `step` was logged, between two checkpoints."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_step(self, run_id, step, metrics):
        if step == self.step:
            raise RuntimeError("simulated crash")


def checkpoint_files(run_dir: Path) -> list[str]:
    root = run_dir / CHECKPOINTS_DIR
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(rewarded, algorithm):
    ws, reward_run = rewarded
    batch = {"ppo.batch_size": 8} if algorithm == "ppo" else {"ppo.batch_size": 2, "ppo.samples_per_prompt": 4}
    cfg = ppo_config(ws, **{"ppo.steps": 6, "ppo.ppo_epochs": 2, "ppo.algorithm": algorithm, **batch})
    straight = run_ppo(ws, cfg, reward_run=reward_run)

    # Crash after step 3 (checkpoint at 2): step 3's rows are past the checkpoint and must be redone.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ppo(ws, cfg, reward_run=reward_run, hooks=CrashAt(3))
    with Store(ws.db_path) as store:
        crashed = store.runs("ppo")[-1]
    assert (crashed.status, crashed.checkpoint_step, max(metric_rows(ws, crashed.id))) == ("failed", 2, 3)

    stopped = run_ppo(ws, cfg, resume_run=crashed.id, hooks=StopAt(5))
    assert (stopped.run_id, stopped.status, stopped.step) == (crashed.id, "stopped", 5)
    assert stopped.checkpoint.endswith("step-5")
    resumed = run_ppo(ws, Config(), resume_run=crashed.id)  # needs nothing but the run id
    assert (resumed.status, resumed.step) == ("finished", 6)

    with Store(ws.db_path) as store:
        rows = {run_id: store.metrics(run_id) for run_id in (straight.run_id, resumed.run_id)}
        samples = {run_id: [(s["step"], s["prompt"], s["response"]) for s in store.samples(run_id)]
                   for run_id in (straight.run_id, resumed.run_id)}
    assert len(rows[resumed.run_id]) == len(rows[straight.run_id]) == 6 * len(METRICS_OF[algorithm])  # no loss or twins
    values = {run_id: {(r["step"], r["name"]): r["value"] for r in rs if r["name"] not in TIMINGS}
              for run_id, rs in rows.items()}
    assert values[resumed.run_id] == values[straight.run_id]  # bit for bit: RNG, optimizer and weights restored
    assert samples[resumed.run_id] == samples[straight.run_id]
    # The same files in the last checkpoint (the stop at step 5 wrote a checkpoint the straight run has not).
    last = {run_id: [name for name in checkpoint_files(ws.run_dir(run_id)) if name.startswith("step-6/")]
            for run_id in (straight.run_id, resumed.run_id)}
    assert last[resumed.run_id] == last[straight.run_id]
    assert "step-6/policy/adapter_model.safetensors" in last[straight.run_id]


def test_resume_refuses_a_finished_run(rewarded):
    ws, reward_run = rewarded
    result = run_ppo(ws, ppo_config(ws, **{"ppo.steps": 1, "ppo.batch_size": 2, "ppo.minibatches": 1}),
                     reward_run=reward_run)
    with pytest.raises(RlhfError, match="already finished"):
        run_ppo(ws, Config(), resume_run=result.run_id)


# -- guards --------------------------------------------------------------------------------------

def test_nan_reward_fails_the_run_and_keeps_the_last_checkpoint(rewarded, monkeypatch):
    ws, reward_run = rewarded
    real_score = SharedBaseReward.score
    calls = []

    def score_turning_nan(self, rollout):
        calls.append(1)
        scores = real_score(self, rollout)
        return scores if len(calls) <= 2 else scores * float("nan")

    monkeypatch.setattr(SharedBaseReward, "score", score_turning_nan)
    cfg = ppo_config(ws, **{"ppo.steps": 4, "ppo.batch_size": 4, "ppo.ppo_epochs": 1})
    result = run_ppo(ws, cfg, reward_run=reward_run)
    assert (result.status, result.step) == ("failed", 2)
    assert "step 3" in result.message and "NaN" in result.message and "step 2" in result.message
    with Store(ws.db_path) as store:
        run = store.run(result.run_id)
    assert (run.status, run.checkpoint_step) == ("failed", 2) and run.error == result.message
    assert Path(run.checkpoint).is_dir()


def test_no_reward_run_is_a_clear_error(workspace):
    with pytest.raises(RlhfError, match="no finished reward run: train one with `rlhf-tui train-reward`"):
        run_ppo(workspace, workspace.load_config())


def test_lock_refuses_a_second_run_and_clears_a_stale_one(workspace):
    lock = workspace.runs_dir / LOCK_FILE
    workspace.runs_dir.mkdir()
    lock.write_text(str(os.getpid()))  # a live process holds it
    with pytest.raises(RlhfError, match=f"another PPO run \\(pid {os.getpid()}\\)"):
        with ppo_lock(workspace):
            pass
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(finished.stdout.strip())  # its process has exited: stale
    with ppo_lock(workspace):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_prompt_batches_cover_every_prompt_each_epoch_and_repeat_by_seed():
    n, batch = 10, 4
    drawn = [i for step in range(1, 6) for i in prompt_batch(n, batch, step, seed=1)]  # 20 draws = 2 epochs
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == list(range(n))
    assert drawn[:10] != drawn[10:]  # each epoch reshuffles
    assert prompt_batch(n, batch, 3, seed=1) == prompt_batch(n, batch, 3, seed=1) != prompt_batch(n, batch, 3, seed=2)


# -- CLI -----------------------------------------------------------------------------------------

def test_cli_ppo_and_runs(rewarded, capsys):
    ws, _ = rewarded
    code = main(["ppo", "--workspace", str(ws.root), "--steps", "2", "--batch-size", "4", "--minibatches", "2",
                 "--epochs", "1", "--lr", "1e-3", "--init-kl", "0.1", "--target-kl", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    progress = [line for line in captured.err.splitlines() if "s/step" in line]  # off a terminal: one line per step
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"]
    assert all("score_mean" in line and "kl_k1" in line and "entropy" in line for line in progress)
    assert "finished 2 steps" in captured.out

    assert main(["runs", "--workspace", str(ws.root), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    ppo_run = runs[-1]
    assert (ppo_run["kind"], ppo_run["status"], ppo_run["step"]) == ("ppo", "finished", 2)
    assert set(ppo_run["final_metrics"]) == METRICS
    assert ppo_run["config"]["ppo"]["init_kl_coef"] == 0.1 and ppo_run["config"]["ppo"]["target_kl"] == 4.0

    assert main(["runs", "show", ppo_run["id"], "--workspace", str(ws.root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [row["step"] for row in shown["steps"]] == [1, 2]
    assert shown["steps"][1]["score_mean"] == ppo_run["final_metrics"]["score_mean"]

    assert main(["runs", "--workspace", str(ws.root)]) == 0
    table = capsys.readouterr().out
    assert ppo_run["id"] in table and "finished" in table


def test_cli_sigterm_stops_after_the_step_with_a_checkpoint(rewarded):
    ws, _ = rewarded
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "ppo", "--workspace", str(ws.root), "--steps", "50",
                             "--batch-size", "4", "--minibatches", "2", "--epochs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    while not any("s/step" in line for line in seen) and proc.poll() is None:
        seen.append(proc.stderr.readline())
    assert " 1/50 " in seen[-1], "".join(seen)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    summary = out.strip().splitlines()[-1]
    assert "stopped at step" in summary and "--resume" in summary and "/50" in summary
    with Store(ws.db_path) as store:
        run = store.runs("ppo")[-1]
    assert run.status == "stopped" and run.checkpoint_step == run.step >= 1
    assert (Path(run.checkpoint) / POLICY_ADAPTER / "adapter_model.safetensors").is_file()
    assert not (ws.runs_dir / LOCK_FILE).exists()
