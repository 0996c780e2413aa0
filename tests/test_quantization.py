"""4-bit models on CPU: right LoRA gradients whichever path bitsandbytes picks, and biased layers that train
(rlhf/quantization.py; that bitsandbytes stays quiet is tests/reliability/test_fault_input.py's
test_ppo_without_a_reward_run_is_one_line_even_with_the_ml_stack_loaded).

bitsandbytes picks its CPU path per layer from the CPU (`has_avx512bf16()` when the layer is built): the
packed-weight path on CPUs with AVX512-BF16, the plain dequantize-and-multiply path elsewhere. Both are
tested on any machine by setting what that check answers while the model loads; our loader must make both
train correctly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from bitsandbytes.nn import modules as bnb_modules
from peft import get_peft_model

from rlhf.lora import lora_config
from rlhf.models import load_causal_lm
from rlhf.reward import train_reward
from tools.tiny import hidden_rule_pairs, workspace_with_pairs

CPU = torch.device("cpu")
# Relative norm of the difference, per LoRA matrix: both models do the same fp32 arithmetic on the same
# weights (measured: 0.0); the bug this guards against gave 0.25-0.98.
GRAD_RTOL = 1e-4


@pytest.fixture(params=["avx512bf16 CPU (packed path)", "other CPU (plain path)"])
def cpu_kind(request, monkeypatch) -> str:
    """Layers built while this fixture is active see the CPU of its name."""
    packed = request.param.startswith("avx512bf16")
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: packed)
    return request.param


def _dequantized_twin(quantized: torch.nn.Module, model_dir: Path) -> torch.nn.Module:
    """The same model in fp32 whose linear layers hold exactly the 4-bit model's dequantized weights."""
    twin = load_causal_lm(str(model_dir), "none", device=CPU)
    twin_modules = dict(twin.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            twin_modules[name].weight.data.copy_(weight.float())
    return twin


def _with_same_random_lora(quantized, twin):
    """Both models with LoRA on every linear layer, holding the same random (non-zero) LoRA values."""
    models = [get_peft_model(m, lora_config(m, r=4, alpha=8, dropout=0.0)) for m in (quantized, twin)]
    generator = torch.Generator().manual_seed(0)
    lora = {name: p for name, p in models[0].named_parameters() if "lora_" in name}
    assert lora
    with torch.no_grad():
        for p in lora.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    models[1].load_state_dict({name: p.detach() for name, p in lora.items()}, strict=False)
    return models


def _loss_and_lora_grads(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_gradients_of_a_4bit_model_match_its_dequantized_twin_after_an_eval_forward(family_dirs, family,
                                                                                        cpu_kind):
    """As rollouts, scoring and held-out evaluation do: an eval-mode forward under no_grad, then training."""
    model_dir = family_dirs(family)
    quantized = load_causal_lm(str(model_dir), "4bit", device=CPU)
    models = _with_same_random_lora(quantized, _dequantized_twin(quantized, model_dir))
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    for model in models:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    (loss_4bit, grads_4bit), (loss_fp32, grads_fp32) = (_loss_and_lora_grads(m, ids) for m in models)

    assert loss_4bit == pytest.approx(loss_fp32, rel=1e-6)
    assert grads_4bit.keys() == grads_fp32.keys()
    off = {name: ((grads_4bit[name] - g).norm() / g.norm()).item() for name, g in grads_fp32.items()}
    assert max(off.values()) <= GRAD_RTOL, {name: round(x, 3) for name, x in off.items() if x > GRAD_RTOL}


def test_a_4bit_reward_model_with_biased_layers_trains_past_its_held_out_evaluation(family_dirs, cpu_kind,
                                                                                    tmp_path):
    """Qwen2's q/k/v biases crashed 4-bit training at `result += bias` once an eval forward had run; the
    held-out evaluation runs before the first step and after each epoch."""
    toml = ('quantization = "4bit"\n[reward]\nquantization = "4bit"\nepochs = 2\nbatch_size = 4\n'
            "heldout_fraction = 0.25\nmax_length = 64\nlora_r = 4\n")
    ws = workspace_with_pairs(tmp_path / "ws", family_dirs("qwen2"), hidden_rule_pairs(8, 2), toml)

    result = train_reward(ws, ws.load_config())

    assert result.status == "finished", result.message



def test_importing_bitsandbytes_never_fetches_hub_kernels(tmp_path):
    """With the optional `kernels` package installed, bitsandbytes would call `get_kernel` on the hub at import
    (on AVX512-BF16 CPUs): our processes refuse that import. A stand-in `kernels` package records any call."""
    marker = tmp_path / "hub-kernel-fetched"
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(
        f"def get_kernel(*args, **kwargs):\n    open({str(marker)!r}, 'w').write(repr(args))\n    raise RuntimeError\n")
    code = "import rlhf, sys; import bitsandbytes; import kernels"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    assert "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr, result.stderr
    assert not marker.exists()


def test_unquantized_share_of_a_4bit_mixture_of_experts_by_hand(family_dirs):
    """Per layer of the tiny Qwen3-MoE (hidden 64, 4 heads of 32, 2 KV heads, 4 experts of 64): 4-bit
    q, k, v, o = 64x128 + 64x64 + 64x64 + 128x64 = 24576 elements; kept as they are: the experts' gate_up
    4x128x64 + down 4x64x64 = 49152 and the router 4x64 = 256. A dense model keeps none."""
    from rlhf.models import load_causal_lm
    from rlhf.quantization import unquantized_warning, unquantized_weight_share

    moe = load_causal_lm(str(family_dirs("qwen3_moe")), "4bit")
    assert unquantized_weight_share(moe) == pytest.approx(49408 / (49408 + 24576))
    assert unquantized_warning(moe).startswith("4-bit quantized only 33% of this model's weights: 67% (a mixture")
    dense = load_causal_lm(str(family_dirs("qwen3")), "4bit")
    assert unquantized_weight_share(dense) == 0.0 and unquantized_warning(dense) is None
