"""On an NVIDIA GPU (skipped without CUDA; benchmarks/gpu_check.sh runs them): 4-bit with bf16 compute trains
LoRA with finite losses, a 4-bit PPO run with gradient checkpointing finishes with finite metrics, chunked
log-probs of a bf16 model match its own logits, and the engine frees its labeling model while a run trains.
"""

from __future__ import annotations

import math

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import get_peft_model

from rlhf.lora import lora_config
from rlhf.models import load_causal_lm
from rlhf.ppo import prepare_prompts, run_ppo
from rlhf.ppo_trainer import build_trainer, response_forward, response_logprobs
from rlhf.ppo_math import logprobs_and_entropy_from_logits
from rlhf.reward import train_reward
from rlhf.store import Store
from tools.tiny import hidden_rule_pairs, workspace_with_pairs

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
FOUR_BIT = 'quantization = "4bit"\n[reward]\nquantization = "4bit"\nepochs = 1\ngradient_checkpointing = true\n'


def test_4bit_on_cuda_computes_in_bf16_and_a_lora_step_has_a_finite_loss(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), "4bit", device=CUDA)
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert quantized and all(m.compute_dtype == torch.bfloat16 for m in quantized)
    model = get_peft_model(model, lora_config(model, r=4, alpha=8, dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, model.config.vocab_size, (4, 24), device=CUDA)
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[1] < losses[0]


def test_4bit_reward_and_ppo_with_gradient_checkpointing_finish_on_cuda(tmp_path, tiny_model_dir):
    ws = workspace_with_pairs(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(16, 2), FOUR_BIT)
    reward = train_reward(ws, ws.load_config())
    assert reward.status == "finished", reward.message
    cfg = ws.load_config().override({"ppo.steps": 2, "ppo.batch_size": 8, "ppo.minibatches": 2, "ppo.ppo_epochs": 2,
                                     "ppo.max_new_tokens": 16, "ppo.gradient_checkpointing": True})
    result = run_ppo(ws, cfg, reward_run=reward.run_id)
    assert result.status == "finished", result.message
    with Store(ws.db_path) as store:
        metrics = store.metrics_by_step(result.run_id)
    assert sorted(metrics) == [1, 2]
    for step in metrics.values():
        for name in ("policy_loss", "value_loss", "kl_k1", "entropy", "score_mean"):
            assert math.isfinite(step[name]), (name, step)


def test_chunked_logprobs_of_a_bf16_model_match_its_own_logits_on_cuda(tmp_path, tiny_model_dir):
    """bf16 hidden states in, fp32 log-probs out (each chunk's logits upcast), equal to the model's own."""
    ws = workspace_with_pairs(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(16, 2), "[reward]\nepochs = 1\n")
    trainer = build_trainer(ws, ws.load_config().override({"ppo.batch_size": 4, "ppo.max_new_tokens": 12}),
                            train_reward(ws, ws.load_config()).run_id)
    model = trainer.model.to(torch.bfloat16)
    with Store(ws.db_path) as store:
        prompts, _ = prepare_prompts(store.prompts()[:4], trainer.tokenizer, 64)
    rollout = trainer.rollout(prompts)
    with torch.no_grad():
        hidden = response_forward(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
        ours = response_logprobs(model, hidden, rollout.response_ids, 1.0)
        logits = model.get_base_model().get_output_embeddings()(hidden)
    expected = logprobs_and_entropy_from_logits(logits, rollout.response_ids, 1.0)
    assert hidden.dtype == torch.bfloat16 and ours[0].dtype == torch.float32
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-3)


def test_the_engine_frees_the_labeling_model_while_a_run_trains_on_cuda(workspace, store):
    from test_engine import add_labeled_pairs, running_engine, wait_for

    from rlhf.engine import protocol

    add_labeled_pairs(store, 12)  # free_during_runs is "auto": on a GPU that means freed
    with running_engine(workspace) as client:
        wait_for(client, protocol.Ready)
        one_epoch = workspace.load_config().override({"reward.epochs": 1, "reward.batch_size": 4})
        client.send(protocol.StartReward(one_epoch))
        seen: list = []
        ended = wait_for(client, protocol.RunEnded, seen=seen)
        assert ended.result.status == "finished"
        statuses = [e.message for e in seen if isinstance(e, protocol.Status)]
        assert "freeing the labeling model for the run…" in statuses
        wait_for(client, protocol.Ready)
