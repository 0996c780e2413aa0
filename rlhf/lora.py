"""The one LoRA configuration that reward training and PPO put on a base, whatever its architecture.

peft's "all-linear" picks every linear layer of the decoder: separate q/k/v/o and gate/up/down
projections (Llama, Qwen, Gemma, Mistral), fused ones (Phi-3's `qkv_proj` and `gate_up_proj`, GPT-NeoX's
`query_key_value`), GPT-2's Conv1D layers, and their 4-bit replacements; it leaves out the LM head, tied
to the input embeddings or not. Of an image-text model only the text decoder is adapted. A mixture of
experts (Qwen3-MoE, Mixtral) keeps its experts and router weights as parameters, not linear layers, in
transformers 5: peft adapts them as parameters (`target_parameters`), the router included, as "all-linear" did
when the router was a linear layer.
tests/test_architectures.py checks this for every family.
"""

from __future__ import annotations

from peft import LoraConfig
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


def stores_transposed_weights(model: nn.Module) -> bool:
    """Whether the model's linear layers are Conv1D (GPT-2 style), which keep their weight as
    [in_features, out_features]: LoRA must then be told `fan_in_fan_out=True`.

    A 4-bit load replaces Conv1D by bitsandbytes' Linear4bit with the usual [out, in] layout, so this
    looks at the loaded modules, not at the architecture's name.
    """
    return any(isinstance(module, Conv1D) for module in model.modules())


def layers_outside_the_decoder(model: PreTrainedModel) -> list[str]:
    """Names of the linear layers that are neither in the text decoder nor the LM head: an image-text
    model's vision tower and projector (Gemma 3 4B and up), which never see our text-only inputs."""
    decoder = {id(module) for module in model.get_decoder().modules()}
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and id(module) not in decoder and module is not head]


def lora_config(model: PreTrainedModel, r: int, alpha: float, dropout: float) -> LoraConfig:
    """LoRA of rank `r` (scale `alpha / r`, `dropout` on its input) on every linear layer of `model`'s text
    decoder (never the LM head), biases frozen, as a causal-LM adapter."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                      exclude_modules=layers_outside_the_decoder(model) or None, bias="none",
                      fan_in_fan_out=stores_transposed_weights(model), task_type="CAUSAL_LM")
