"""Loading models and tokenizers from a local directory or a hub id, optionally quantized.

Everything here loads with `use_safetensors=True` (no pickle) and `trust_remote_code` off unless the
config says otherwise. Loaded configs have dropout switched off: reward training and PPO want
deterministic forwards (log-probs of the same tokens must agree between rollout and update).
"""

from __future__ import annotations

import hashlib
import json
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants as hf_constants
from safetensors import SafetensorError, safe_open
from transformers import CONFIG_MAPPING
from transformers import __version__ as transformers_version
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from .config import QUANTIZATION, Config
from .errors import ModelLoadError
from .paths import demo_model_dir
from .quantization import keep_4bit_weights_unpacked

# Per-shard "Loading weights" bars would garble the CLI's progress line and the engine's stderr; so would
# this deprecation warning, raised inside peft on every adapter load with transformers 5.
hf_logging.disable_progress_bar()
# Library warnings on stderr would come before (and bury) our one-line messages; the CLI and engine report
# what matters themselves.
hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def resolve_model_name(cfg: Config) -> str:
    """The policy base to load: `[model] name`, or the bundled demo model when that is empty."""
    if cfg.model.name:
        return cfg.model.name
    try:
        demo = demo_model_dir()
    except FileNotFoundError:
        demo = None
    if demo is not None and (demo / "config.json").is_file():
        return str(demo)
    raise ModelLoadError("no model configured: pass --model ID_OR_PATH or set [model] name in rlhf.toml")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization_config(kind: str, device: torch.device | None = None) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for `kind` (none, 4bit NF4 with double quant, 8bit)."""
    if kind not in QUANTIZATION:
        raise ModelLoadError(f"quantization must be one of {', '.join(QUANTIZATION)}, got {kind!r}")
    if kind == "none":
        return None
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    device = device or pick_device()
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )


def _local_dir(name: str) -> Path | None:
    """The directory `name` points to, None for a hub id; a path that is not a directory is an error."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"cannot load model {name!r}: it is a file, not a model folder; pass the folder that "
                             "holds config.json and the weights with --model /path/to/model")
    # A hub id is `name` or `org/name`; anything else can only have meant a local path.
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"cannot load model {name!r}: not a local directory (no such folder; a path is never "
                             "looked up on the hub); pass a local path with --model /path/to/model")
    return None


def _check_tokenizer_files(path: Path) -> None:
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer next to the model")


def _check_folder_files(path: Path) -> None:
    """After a load from the local folder `path` failed: a ModelLoadError naming the file to blame (config.json
    missing, a JSON file garbled, a model_type this transformers does not know, a truncated safetensors file);
    nothing when the files look whole (the caller then re-raises what the library said)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json, so this is not a model folder saved with save_pretrained; "
                             "pass the folder that holds config.json and the weights")
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:  # not UTF-8, not JSON
            raise ModelLoadError(f"{file}: not valid JSON ({_first_line(exc)}); copy the model folder again") from None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(config, dict) and "auto_map" not in config and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{config_file}: model_type {model_type!r} is not one transformers {transformers_version} "
                             "knows; upgrade transformers (pip install -U transformers) or fix config.json")
    for file in sorted(path.glob("*.safetensors")):
        try:
            safe_open(file, framework="pt").keys()
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file}: damaged or truncated ({_first_line(exc)}); copy the model folder "
                                 "again") from None


def _check_weight_files(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(f"{path}: only pickle weights (*.bin/*.pt), which are not loaded for safety; "
                             "convert them to safetensors (save_pretrained(..., safe_serialization=True))")
    raise ModelLoadError(f"{path}: no model weights (*.safetensors) in this directory")


def safetensors_adapter(path: str | Path) -> str:
    """`path` as a string for peft, once it is known to hold a LoRA adapter in safetensors.

    peft falls back to `adapter_model.bin` through torch.load (a pickle: it can run code) when there is no
    safetensors file, and to the hub when there is no folder: both are refused here."""
    folder = Path(path)
    if not ((folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()):
        pickled = " (only a pickle adapter_model.bin, which is not loaded for safety)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise ModelLoadError(f"{folder}: no LoRA adapter here: expected adapter_config.json and "
                             f"adapter_model.safetensors{pickled}; save the adapter with "
                             "save_pretrained(..., safe_serialization=True)")
    return str(folder)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a connection (huggingface_hub would otherwise retry for a minute)."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    url = urlsplit(hf_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _from_pretrained(load: Any, name: str, local: Path | None, **kwargs: Any) -> Any:
    """Run a from_pretrained call, turning a missing/unreadable model into a one-line ModelLoadError.

    A hub id is looked up in the local cache first, so a model downloaded once keeps working offline.
    """
    try:
        return load(str(local or name), local_files_only=True, **kwargs)
    except OSError as exc:
        if local is not None:
            _check_folder_files(local)
            raise ModelLoadError(f"{local}: cannot load ({_first_line(exc)})") from None
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            if local is not None:
                _check_folder_files(local)
            raise
        raise ModelLoadError(f"{local or name}: this model needs its own Python code (auto_map in its config), "
                             "which rlhf-tui runs only when your rlhf.toml says [model] trust_remote_code = true; "
                             "read that code first") from None
    except Exception as exc:  # a damaged folder as safetensors, tokenizers or a shape check says it; OOM: the caller's
        if local is None or isinstance(exc, torch.OutOfMemoryError):
            raise
        _check_folder_files(local)
        if "mismatched_sizes" in str(exc):  # transformers' shape check, e.g. hidden_size edited in config.json
            raise ModelLoadError(f"{local}: the weights do not fit config.json (tensors of other shapes than its "
                                 "sizes, such as hidden_size, say): take config.json and the weights from the same "
                                 "model") from None
        if getattr(load, "__self__", None) is AutoTokenizer:  # valid JSON, wrong contents: tokenizers' KeyError & co
            raise ModelLoadError(f"{local}: cannot load its tokenizer ({type(exc).__name__}: {_first_line(exc)}); "
                                 "copy the tokenizer files of the model again") from None
        raise
    if not _hub_reachable():
        raise ModelLoadError(f"cannot load model {name!r}: not a local directory and the hub is unreachable; "
                             "pass a local path with --model /path/to/model")
    try:
        return load(name, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name!r} from the hub ({_first_line(exc)}); "
                             "pass a local path with --model /path/to/model") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(name: str, *, trust_remote_code: bool = False,
                   padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (eos, else unk, when it has none) and left padding."""
    local = _local_dir(name)
    if local is not None:
        _check_tokenizer_files(local)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, local, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(f"{name}: tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = padding_side
    return tokenizer


def disable_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """Set every dropout probability in a model config (`*dropout*`, `*_pdrop`) to 0."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)
    return config


def check_decoder_only(config: PretrainedConfig, name: str) -> None:
    """A one-line error for a model rlhf-tui cannot train: an encoder-decoder (T5, BART) or a model type with no
    causal-LM class in transformers. Remote-code models (auto_map) bring their own class."""
    if getattr(config, "auto_map", None):
        return
    if config.is_encoder_decoder:
        reason = "an encoder-decoder model"
    elif config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        reason = "not a causal language model transformers can load"
    else:
        return
    raise ModelLoadError(f"{name}: a {config.model_type} model is {reason}; rlhf-tui trains decoder-only language "
                         "models (Llama, Qwen, Gemma, Mistral, Phi, GPT-2 and the like): pass one with --model")


def _load(auto_class: Any, name: str, quantization: str, *, trust_remote_code: bool, device: torch.device | None,
          dtype: torch.dtype | None, **config_overrides: Any) -> PreTrainedModel:
    local = _local_dir(name)
    if local is not None:
        _check_weight_files(local)
    device = device or pick_device()
    config = _from_pretrained(AutoConfig.from_pretrained, name, local, trust_remote_code=trust_remote_code)
    check_decoder_only(config, name)
    disable_dropout(config)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    quant = quantization_config(quantization, device)
    kwargs: dict[str, Any] = {}
    if quant is not None:
        kwargs = {"quantization_config": quant, "device_map": {"": device}}
    if dtype is None:
        # Quantized on CUDA: keep the unquantized layers in the bf16 compute dtype; elsewhere fp32.
        dtype = torch.bfloat16 if quant is not None and device.type == "cuda" else torch.float32
    try:
        model = _from_pretrained(auto_class.from_pretrained, name, local, config=config, use_safetensors=True,
                                 trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)
        if quant is None:
            model.to(device)
    except torch.OutOfMemoryError:
        raise ModelLoadError(f"{name}: out of GPU memory loading it with quantization {quantization!r}: set "
                             "quantization = \"4bit\" ([model], or [reward] for the reward base) or use a smaller "
                             "model") from None
    if quantization == "4bit" and device.type == "cpu":
        keep_4bit_weights_unpacked(model)
    return model


def load_causal_lm(name: str, quantization: str = "none", *, trust_remote_code: bool = False,
                   device: torch.device | None = None, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM on `device` (default: CUDA if present); fp32 except quantized on CUDA (bf16)."""
    return _load(AutoModelForCausalLM, name, quantization, trust_remote_code=trust_remote_code, device=device,
                 dtype=dtype)


def load_sequence_classifier(name: str, quantization: str = "none", *, pad_token_id: int | None = None,
                             trust_remote_code: bool = False, device: torch.device | None = None,
                             dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The base with a fresh one-output score head (num_labels=1), as trl's RewardTrainer expects."""
    if pad_token_id is None:
        pad_token_id = load_tokenizer(name, trust_remote_code=trust_remote_code).pad_token_id
    return _load(AutoModelForSequenceClassification, name, quantization, trust_remote_code=trust_remote_code,
                 device=device, dtype=dtype, num_labels=1, pad_token_id=pad_token_id)


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt_text: str,
                  messages: list[dict[str, str]] | None = None) -> str:
    """The prompt as the policy sees it: the chat template with a generation prompt, else the plain text."""
    if not tokenizer.chat_template:
        return prompt_text
    turns = messages or [{"role": "user", "content": prompt_text}]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, formatted: str) -> list[int]:
    """Token ids of a formatted prompt, adding BOS only when the chat template did not already."""
    has_bos = tokenizer.bos_token is not None and formatted.startswith(tokenizer.bos_token)
    return tokenizer(formatted, add_special_tokens=not has_bos)["input_ids"]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends an answer: the model's generation EOS ids (chat models list several, e.g.
    `<|im_end|>` and `<|endoftext|>`), then the tokenizer's EOS if they leave it out (an older generation
    config that names only the base model's end-of-text, while the chat template ends turns with another)."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return list(dict.fromkeys(i for i in [*ids, tokenizer.eos_token_id] if i is not None))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides token ids and prompt format: vocabulary, special tokens, chat template."""
    content = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()[:16]


@contextmanager
def adapter_active(peft_model: Any, adapter_name: str) -> Iterator[None]:
    """Run the PeftModel with `adapter_name` active, in eval mode, then restore the previously active
    adapter, every parameter's requires_grad flag (peft's set_adapter makes the active adapter trainable)
    and each module's train/eval mode."""
    previous = peft_model.active_adapter
    requires_grad = {p: p.requires_grad for p in peft_model.parameters()}
    training = {m: m.training for m in peft_model.modules()}
    peft_model.eval()
    peft_model.set_adapter(adapter_name)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        for module, flag in training.items():
            module.training = flag
