"""Model and tokenizer loading through rlhf.models, on the tiny random Llama (none, 4bit, 8bit on CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import rlhf.models as models
from rlhf.config import Config
from rlhf.errors import ModelLoadError
from rlhf.models import (disable_dropout, encode_prompt, format_prompt, load_causal_lm, load_sequence_classifier,
                         load_tokenizer, quantization_config, resolve_model_name, tokenizer_fingerprint)
from tools.tiny import CHAT_TEMPLATE, build_tiny_llama


def _copy_without(src: Path, dst: Path, *patterns: str) -> Path:
    shutil.copytree(src, dst)
    for pattern in patterns:
        for f in dst.glob(pattern):
            f.unlink()
    return dst


def test_tiny_model_is_saved_as_safetensors_with_special_tokens(tiny_model_dir):
    files = {f.name for f in tiny_model_dir.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    tok = load_tokenizer(str(tiny_model_dir))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok("hello")["input_ids"][0] == tok.bos_token_id


def test_tiny_model_is_seeded(tmp_path):
    a = load_causal_lm(str(build_tiny_llama(tmp_path / "a", seed=3)))
    b = load_causal_lm(str(build_tiny_llama(tmp_path / "b", seed=3)))
    c = load_causal_lm(str(build_tiny_llama(tmp_path / "c", seed=4)))
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_load_full_precision_forward_and_generate(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.attention_dropout == 0.0
    enc = tok([format_prompt(tok, "hi"), format_prompt(tok, "the cat sees a red house")],
              return_tensors="pt", padding=True)
    assert model(**enc).logits.shape == (*enc["input_ids"].shape, len(tok))
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("kind, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_load_quantized_on_cpu(tiny_model_dir, kind, layer):
    import bitsandbytes as bnb

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), kind)
    quantized = [m for m in model.modules() if isinstance(m, getattr(bnb.nn, layer))]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    enc = tok([format_prompt(tok, "a dog reads")], return_tensors="pt")
    assert torch.isfinite(model(**enc).logits).all()
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


def test_quantization_config_settings():
    assert quantization_config("none") is None
    q4 = quantization_config("4bit", torch.device("cpu"))
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.float32
    assert quantization_config("4bit", torch.device("cuda")).bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit").load_in_8bit
    with pytest.raises(ModelLoadError, match="quantization must be one of"):
        quantization_config("3bit")


def test_sequence_classifier_has_one_output_and_pad_id(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_sequence_classifier(str(tiny_model_dir))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    enc = tok(["a b c", "the dog"], return_tensors="pt", padding=True)
    assert model(**enc).logits.shape == (2, 1)


def test_tokenizer_pads_left_and_falls_back_to_eos(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.padding_side == "left"
    enc = tok(["a", "the old man sees a boat"], padding=True)
    assert enc["input_ids"][0][0] == tok.pad_token_id and enc["attention_mask"][0][0] == 0
    assert load_tokenizer(str(tiny_model_dir), padding_side="right").padding_side == "right"

    no_pad = _copy_without(tiny_model_dir, tmp_path / "no-pad")
    raw = load_tokenizer(str(no_pad))
    raw.pad_token = None
    raw.save_pretrained(no_pad)
    assert load_tokenizer(str(no_pad)).pad_token == "</s>"


def test_chat_template_is_applied_when_present(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.chat_template == CHAT_TEMPLATE
    assert format_prompt(tok, "hi there") == "user: hi there\nassistant:"
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "three"}]
    assert format_prompt(tok, "three", messages) == "user: one\nassistant: two\nuser: three\nassistant:"

    plain = load_tokenizer(str(build_tiny_llama(tmp_path / "plain", chat_template=False)))
    assert format_prompt(plain, "hi there") == "hi there"


def test_encode_prompt_adds_bos_once(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    ids = encode_prompt(tok, "user: hi\nassistant:")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    # A template that already starts with BOS (as Llama 3's does) must not get a second one.
    assert encode_prompt(tok, "<s>user: hi\nassistant:") == ids


def test_disable_dropout_zeroes_every_dropout_field(tiny_model_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.attention_dropout, cfg.resid_pdrop, cfg.hidden_size = 0.1, 0.2, 64
    disable_dropout(cfg)
    assert (cfg.attention_dropout, cfg.resid_pdrop, cfg.hidden_size) == (0.0, 0.0, 64)


def test_resolve_model_name(tmp_path, monkeypatch):
    cfg = Config()
    cfg.model.name = "org/model"
    assert resolve_model_name(cfg) == "org/model"
    monkeypatch.setattr(models, "demo_model_dir", lambda: tmp_path / "missing-demo")
    with pytest.raises(ModelLoadError, match=r"no model configured: pass --model ID_OR_PATH"):
        resolve_model_name(Config())
    demo = build_tiny_llama(tmp_path / "demo")
    monkeypatch.setattr(models, "demo_model_dir", lambda: demo)
    assert resolve_model_name(Config()) == str(demo)


def test_missing_path_says_how_to_pass_a_local_one(tmp_path):
    for name in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(ModelLoadError, match=r"not a local directory .* --model /path/to/model"):
            load_causal_lm(name)
        with pytest.raises(ModelLoadError, match="not a local directory"):
            load_tokenizer(name)


def test_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.setattr(models.hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"'nobody/nothing': not a local directory and the hub is unreachable"):
        load_tokenizer("nobody/nothing")


def test_directory_without_tokenizer_or_weights(tiny_model_dir, tmp_path):
    no_tok = _copy_without(tiny_model_dir, tmp_path / "no-tok", "tokenizer*")
    with pytest.raises(ModelLoadError, match=rf"{no_tok}: no tokenizer files \(expected one of tokenizer.json"):
        load_tokenizer(str(no_tok))

    no_weights = _copy_without(tiny_model_dir, tmp_path / "no-weights", "*.safetensors")
    with pytest.raises(ModelLoadError, match=rf"{no_weights}: no model weights \(\*.safetensors\)"):
        load_causal_lm(str(no_weights))

    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_causal_lm(str(no_weights))


def test_remote_code_off_and_safetensors_only_by_default(tiny_model_dir, monkeypatch):
    calls = []
    for cls in (models.AutoModelForCausalLM, models.AutoTokenizer, models.AutoConfig):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            calls.append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_tokenizer(str(tiny_model_dir))
    load_causal_lm(str(tiny_model_dir))
    assert len(calls) >= 3  # AutoTokenizer also reads the config itself
    assert all(call.get("trust_remote_code", False) is False for call in calls)
    assert calls[-1]["use_safetensors"] is True
    assert Config().model.trust_remote_code is False and Config().reward.base == ""


def test_tokenizer_fingerprint_tells_tokenizers_apart(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(str(tiny_model_dir)))
    other_vocab = load_tokenizer(str(build_tiny_llama(tmp_path / "v", vocab_size=300)))
    no_template = load_tokenizer(str(build_tiny_llama(tmp_path / "t", chat_template=False)))
    assert len({tokenizer_fingerprint(t) for t in (tok, other_vocab, no_template)}) == 3
