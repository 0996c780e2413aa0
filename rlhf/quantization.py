"""bitsandbytes workarounds: 4-bit layers that train correctly on every CPU, and a quiet bitsandbytes.

The CPU packed-weight path (bitsandbytes 0.49+, PR #1804 "Cpu fused kernel"; taken on CPUs with
AVX512-BF16). `Linear4bit.forward` converts its weight to a packed layout for a fused bf16 kernel, in place
and for good, the first time it runs in eval mode on an input that does not require grad: any rollout,
scoring or held-out forward under `torch.no_grad()`. Every later forward, training ones included, then goes
through `gemv_4bit`, which has no backward ("an autograd kernel was not registered"):
- the gradient stops at every 4-bit layer: the losses still agree, but the LoRA gradients of all layers
  below the last one were 25-98% off (tests/test_quantization.py);
- a layer with a bias (Qwen2's q/k/v, GPT-NeoX, GPT-2) crashes at `result += bias` in `matmul_4bit`
  ("a view of a leaf Variable that requires grad is being used in an in-place operation");
- the packing rounds the block scales to bf16 and the kernel computes in bf16, so eval-mode log-probs
  differ from training-mode ones, and unpacking (`_convert_weight_packed_for_cpu_inverse`, see also
  bitsandbytes issue #2078) cannot give the original weights back.
The layer takes that path only while its `support_avx512bf16_for_cpu` flag (set from the CPU when the layer
is built) is on; turned off, every forward dequantizes and multiplies in the compute dtype, as on CPUs
without AVX512-BF16. That costs speed on such CPUs (4-bit generation was about 1.5-2.5x slower in our
measurement), never correctness. CUDA never reads the flag.

Nothing here imports torch or bitsandbytes at module level: rlhf/__init__ imports this module, and the UI
process must stay free of both.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def quiet_bitsandbytes_logging() -> None:
    """Keep bitsandbytes' warnings off stderr, where they would come before our one-line messages.

    Importing bitsandbytes on an AVX512-BF16 CPU logs "Failed to load CPU gemm_4bit_forward from
    kernels-community ..." (an optional hub kernel package; bitsandbytes issue #2064), and its 8-bit layers
    log a dtype cast on every CPU forward: advice for the library's developers, not our users; real failures
    raise. peft imports bitsandbytes whenever it is installed (peft/helpers.py), whatever the quantization,
    so this has to run before anything imports peft: rlhf/__init__ calls it.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def refuse_hub_kernels() -> None:
    """Keep bitsandbytes from fetching and running compiled code from the hub at import.

    On an AVX512-BF16 CPU, importing bitsandbytes calls `kernels.get_kernel("kernels-community/...")` when the
    optional `kernels` package is installed: code from the network, whatever `trust_remote_code` says. The
    kernel serves only the packed-weight path that `keep_4bit_weights_unpacked` turns off, so nothing is lost:
    a `None` entry in sys.modules makes that import fail, and bitsandbytes falls back as it does without it.
    """
    sys.modules.setdefault("kernels", None)  # type: ignore[arg-type]


def keep_4bit_weights_unpacked(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU packed-weight path (see the module docstring) on every 4-bit layer of
    `model`, before its first forward. Returns the number of layers it changed."""
    from bitsandbytes.nn import Linear4bit

    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# Above this share of unquantized weights a "4-bit" model is mostly full precision: say so before a run.
UNQUANTIZED_WARNING_SHARE = 0.2


def unquantized_weight_share(model: nn.Module) -> float:
    """Of the text decoder's weights (its matrices and expert tensors; embeddings, norms and LoRA adapters
    aside), the share a 4-bit load left unquantized, by element count.

    bitsandbytes replaces linear layers only: a dense model's share is 0. transformers keeps a mixture of
    experts' experts as 3D tensors (Qwen3-MoE, Mixtral, OLMoE...), which it leaves in the compute dtype, and
    they are most of such a model's weights."""
    from bitsandbytes.nn import Linear4bit
    from torch import nn

    quantized = unquantized = 0
    for name, module in model.get_decoder().named_modules():
        if isinstance(module, Linear4bit):
            quantized += module.in_features * module.out_features
        elif not isinstance(module, nn.Embedding) and "lora_" not in name:
            unquantized += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
    total = quantized + unquantized
    return unquantized / total if total else 0.0


def unquantized_warning(model: nn.Module) -> str | None:
    """The warning for a 4-bit model that stays mostly in full precision (`unquantized_weight_share`), or None."""
    share = unquantized_weight_share(model)
    if share <= UNQUANTIZED_WARNING_SHARE:
        return None
    return (f"4-bit quantized only {1 - share:.0%} of this model's weights: {share:.0%} (a mixture of experts' "
            "expert tensors: bitsandbytes quantizes linear layers only) stay in the compute dtype, so it needs "
            "about that much more memory than a 4-bit model of its size")
