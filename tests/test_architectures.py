"""Every popular model family through our own code paths, in full precision and in 4-bit.

Tiny random models are built at test time from transformers' config classes (`tools.tiny.FAMILIES`): per
family, a labeling pair is sampled the way the engine samples it, a reward model trains, its export loads
in plain transformers + peft and scores as ours does, and PPO runs two steps with its value head on the
model's hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from rlhf.checkpoints import checkpoint_path
from rlhf.cli import main
from rlhf.hooks import RunHooks
from rlhf.lora import lora_config
from rlhf.models import load_causal_lm, load_sequence_classifier, load_tokenizer
from rlhf.ppo import run_ppo
from rlhf.ppo_trainer import response_forward, response_logprobs
from rlhf.reward import train_reward
from rlhf.reward_model import RewardScorer, encode_response, export_sequence_classifier, standardise
from rlhf.sampling import PairSampler
from rlhf.tokens import pad_left
from tools.tiny import (FAMILIES, generated_sentences, hidden_rule_pairs, train_byte_level_tokenizer,
                       workspace_with_pairs)

QUANTIZATIONS = ("none", "4bit")
SETTINGS = """quantization = "{q}"
[sampling]
max_new_tokens = 8
[reward]
quantization = "{q}"
epochs = 1
batch_size = 8
heldout_fraction = 0.25
max_length = 64
[ppo]
steps = 2
batch_size = 4
minibatches = 2
ppo_epochs = 1
max_new_tokens = 8
checkpoint_every = 1
"""


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like module (nn.Linear and its 4-bit subclass, GPT-2's Conv1D) by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_covers_every_decoder_linear_layer_and_never_the_lm_head(family_dirs, family, quantization):
    base = load_causal_lm(str(family_dirs(family)), quantization)
    in_decoder = {id(m) for m in base.get_decoder().modules()}
    layers = {name: m for name, m in _linear_layers(base).items() if id(m) in in_decoder}
    assert layers, "the decoder has linear layers to adapt"
    # A mixture of experts: its experts (3D tensors) and routers are parameters, not layers; adapted as such.
    experts = {name for name, m in base.named_modules() if name.endswith((".mlp.experts", ".mlp.gate"))
               and not isinstance(m, nn.Linear)}
    assert bool(experts) == (family == "qwen3_moe")
    lm_head = base.get_output_embeddings()
    model = get_peft_model(base, lora_config(base, r=4, alpha=8, dropout=0.0))
    # peft wraps each adapted tensor in a layer of its own (`experts`, `experts.base_layer`): name the module once
    adapted = {name.replace(".base_layer", "") for name, m in model.get_base_model().named_modules()
               if hasattr(m, "lora_A")}
    assert adapted == set(layers) | experts  # and nothing outside the text decoder (a vision tower)
    assert not hasattr(model.get_base_model().get_output_embeddings(), "lora_A")
    assert model.get_base_model().get_output_embeddings() is lm_head
    # GPT-2 keeps Conv1D (weights stored [in, out]) in full precision only: LoRA must know, or its update is
    # the transpose of what it should be; 4-bit loads turn Conv1D into ordinary [out, in] layers.
    conv1d = any(isinstance(m, Conv1D) for m in layers.values())
    assert model.peft_config["default"].fan_in_fan_out == conv1d
    assert conv1d == (family == "gpt2" and quantization == "none")


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ppo_logprobs_of_a_left_padded_batch_are_the_models_own(family_dirs, family, quantization):
    """What PPO computes for each response token (decoder, LM head, Gemma's soft-capping, positions that skip
    the left padding) is the distribution the model's own forward gives each row alone, unpadded."""
    model_dir = family_dirs(family)
    base = load_causal_lm(str(model_dir), quantization)
    model = get_peft_model(base, lora_config(base, r=4, alpha=8, dropout=0.0)).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (5, 13)]
    responses = torch.randint(3, 300, (2, 12), generator=generator)
    pad = load_tokenizer(str(model_dir)).pad_token_id
    prompt_ids, prompt_mask = pad_left(prompts, pad, torch.device("cpu"))
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(responses)], dim=1)
    with torch.no_grad():
        hidden = response_forward(model, input_ids, mask, prompt_ids.shape[1])
        ours, _ = response_logprobs(model, hidden, responses, temperature=1.0)
        for row, prompt in enumerate(prompts):
            alone = torch.tensor([prompt + responses[row].tolist()])
            logits = model(input_ids=alone).logits[0, len(prompt) - 1:-1].float()
            own = torch.log_softmax(logits, dim=-1).gather(-1, responses[row, :, None]).squeeze(-1)
            assert torch.allclose(ours[row], own, atol=1e-4), (ours[row] - own).abs().max()


def _scores_of_export(export_dir: Path, model_dir: Path, quantization: str,
                      items: list[tuple[str, str]]) -> torch.Tensor:
    """Standardised scores from the exported adapter on AutoModelForSequenceClassification (right padding)."""
    tok = load_tokenizer(str(model_dir))
    base = load_sequence_classifier(str(model_dir), quantization, pad_token_id=tok.pad_token_id)
    classifier = PeftModel.from_pretrained(base, str(export_dir)).eval()
    seqs = [encode_response(tok, p, r, 64)[0] for p, r in items]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logits = classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
    norm = json.loads((export_dir / "reward.json").read_text())["normalisation"]
    return standardise(logits, norm["mean"], norm["std"])


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_whole_loop_runs_on_every_family(family_dirs, family, quantization, tmp_path):
    model_dir = family_dirs(family)
    ws = workspace_with_pairs(tmp_path / "ws", model_dir, hidden_rule_pairs(8, 2),
                              SETTINGS.format(q=quantization))
    cfg = ws.load_config()

    # Labeling: the engine's sampler on the policy base.
    tokenizer = load_tokenizer(str(model_dir))
    sampler = PairSampler(load_causal_lm(str(model_dir), quantization), tokenizer, cfg.sampling,
                          cfg.model.max_prompt_tokens)
    pair = sampler.sample("Tell me about the river.", None, prompt_id=1, draw=0)
    assert len(pair.answers) == 2 and all(0 < a.tokens <= 8 for a in pair.answers)

    # Reward model: trains, and its export scores the same in plain transformers + peft.
    warned = WarningsKept()
    reward = train_reward(ws, cfg, hooks=warned)
    assert reward.status == "finished", reward.message
    items = [("Hi", " A dog likes a good cake."), ("Tell me", " A cold boat and a red tree.")]
    ours = torch.tensor(RewardScorer.from_run(ws, reward.run_id, cfg).score_many(items))
    exported = export_sequence_classifier(ws.run_dir(reward.run_id), tmp_path / "exported")
    assert torch.allclose(_scores_of_export(exported, model_dir, quantization, items), ours, atol=1e-4)

    # PPO: two steps on one shared base; the value head sits on the model's hidden size.
    result = run_ppo(ws, cfg, hooks=warned)
    assert result.status == "finished", result.message
    value_head = load_file(checkpoint_path(ws.run_dir(result.run_id), 2) / "value_head.safetensors")
    hidden = load_causal_lm(str(model_dir)).config.get_text_config().hidden_size
    assert value_head["linear.weight"].shape == (1, hidden)

    # A "4-bit" mixture of experts is mostly full precision (its experts are not linear layers): both runs say so.
    unquantized = [m for m in warned.messages if m.startswith("4-bit quantized only 33% of this model's weights")]
    assert len(unquantized) == (2 if family == "qwen3_moe" and quantization == "4bit" else 0), warned.messages


class WarningsKept(RunHooks):
    """Run hooks that keep every warning a run gives."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def on_warning(self, run_id: str, message: str) -> None:
        self.messages.append(message)


def test_an_encoder_decoder_model_is_one_line_that_names_it(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = train_byte_level_tokenizer(generated_sentences(), 384)
    model_dir = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                        num_heads=2, decoder_start_token_id=tokenizer.pad_token_id)
                               ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ws = workspace_with_pairs(tmp_path / "ws", model_dir, hidden_rule_pairs(8, 2))
    capsys.readouterr()
    assert main(["train-reward", "--workspace", str(ws.root)]) == 2
    assert capsys.readouterr().err == (f"rlhf-tui: error: {model_dir}: a t5 model is an encoder-decoder model; "
                                       "rlhf-tui trains decoder-only language models (Llama, Qwen, Gemma, Mistral, "
                                       "Phi, GPT-2 and the like): pass one with --model\n")

