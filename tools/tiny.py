"""Build a small random Llama with its own byte-level BPE tokenizer, saved like a hub checkpoint.

Tests, benchmarks and the demo-model script load it through the same code as a real model
(`rlhf.models`), so nothing needs the hub. The default size (~0.13M parameters) builds in well under
a second; larger sizes serve benchmarks (hidden 512, 10 layers, intermediate 1536: ~35M parameters).
"""

from __future__ import annotations

import itertools
import json
import random
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from rlhf.config import Workspace
from rlhf.data_io import import_pairs
from rlhf.store import PromptItem, Store

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Turns rendered as "user: ...\n" / "assistant: ...\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the old man", "a small bird",
             "the robot", "her brother", "the farmer", "a student", "the river", "this city", "the sun"]
_VERBS = ["sees", "likes", "builds", "finds", "paints", "carries", "follows", "reads", "writes", "cleans",
          "opens", "watches", "helps", "answers", "asks about"]
_ADJECTIVES = ["red", "quiet", "happy", "large", "tiny", "bright", "cold", "warm", "strange", "good",
               "green", "fast", "slow", "kind", "old", "new"]
_OBJECTS = ["house", "book", "garden", "question", "letter", "tree", "road", "song", "window", "boat",
            "apple", "story", "machine", "bridge", "cake", "river"]
_ENDINGS = [".", ".", ".", "!", "?"]


def generated_sentences(count: int = 3000, seed: int = 0) -> list[str]:
    """Simple seeded English sentences: enough variety for a BPE to learn common words."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(["the", "a", "every", "one"]),
                 rng.choice(_ADJECTIVES), rng.choice(_OBJECTS)]
        if rng.random() < 0.3:
            words += ["and", rng.choice(_VERBS), "it", rng.choice(["today", "again", "slowly", "at night"])]
        sentence = " ".join(words) + rng.choice(_ENDINGS)
        out.append(sentence[0].upper() + sentence[1:])
    return out


def hidden_rule_pairs(num_prompts: int = 50, pairs_per_prompt: int = 4, *, word: str = "good",
                      seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs (trl format: prompt, chosen, rejected) decided by a hidden rule: the answer that
    uses `word` more often wins.

    Both answers fill the same three adjective slots of one sentence shape, `word` or another adjective,
    so they have the same number of words and only the count of `word` tells them apart.
    """
    rng = random.Random(seed)
    others = [a for a in _ADJECTIVES if a != word]

    def answer(count: int) -> str:
        slots = [word] * count + [rng.choice(others) for _ in range(3 - count)]
        rng.shuffle(slots)
        objects = rng.sample(_OBJECTS, 3)
        return (f" {rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} a {slots[0]} {objects[0]}, "
                f"a {slots[1]} {objects[1]} and a {slots[2]} {objects[2]}.")

    pairs = []
    for i in range(num_prompts):
        prompt = f"Tell me about {rng.choice(_SUBJECTS)} and the {rng.choice(_OBJECTS)} ({i})."
        for _ in range(pairs_per_prompt):
            fewer = rng.randint(0, 2)
            more = rng.randint(fewer + 1, 3)
            pairs.append({"prompt": prompt, "chosen": answer(more), "rejected": answer(fewer)})
    return pairs


def train_byte_level_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes, nothing is unknown) that prepends <s> like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_tiny_llama(out_dir: Path | str, *, corpus: Iterable[str] | None = None, vocab_size: int = 384,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                     max_position_embeddings: int = 512, chat_template: bool = True, seed: int = 0) -> Path:
    """Train a tokenizer on `corpus` (default: the generated sentences), build a seeded random
    LlamaForCausalLM of these sizes and save both (safetensors) to `out_dir`, which it returns.

    The global torch RNG is left as it was.
    """
    tokenizer = train_byte_level_tokenizer(corpus if corpus is not None else generated_sentences(seed=seed),
                                           vocab_size)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    sizes = {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
             "num_key_value_heads": num_heads, "intermediate_size": intermediate_size,
             "max_position_embeddings": max_position_embeddings}
    return build_tiny_model(out_dir, "llama", tokenizer=tokenizer, sizes=sizes, seed=seed)


# Each popular family at tiny size: its transformers config class and the settings that make it that family
# (the sizes are shared: hidden 64, 2 layers, 4 heads, intermediate 128). SmolLM 1/2 are Llama shapes and
# Phi-4 is the Phi-3 architecture, so "llama" and "phi3" stand for them. Gemma 2 caps its final logits at 30;
# the tiny one at 1, so that code which skips the capping gets visibly different log-probs.
FAMILIES: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": True}),  # q/k/v carry a bias
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True}),  # q/k norm
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32,
                                "sliding_window": 8, "final_logit_softcapping": 1.0,
                                "attn_logit_softcapping": 50.0, "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32,
                                    "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                                    "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    # Mixture of experts: transformers keeps each layer's experts as 3D parameters, not nn.Linear layers (peft
    # adapts them as parameters); a linear router picks 2 of 4 experts per token.
    "qwen3_moe": ("Qwen3MoeConfig", {"num_key_value_heads": 2, "head_dim": 32, "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "tie_word_embeddings": False}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),  # fused qkv_proj and gate_up_proj
    "gpt_neox": ("GPTNeoXConfig", {"tie_word_embeddings": False}),  # fused query_key_value, parallel residual
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 512}),  # Conv1D
    "smollm3": ("SmolLM3Config", {"num_key_value_heads": 2, "no_rope_layers": [1, 0],
                                  "tie_word_embeddings": True}),  # no rotary embedding on every 4th layer
    # Gemma 3 4B/12B/27B checkpoints: the text decoder is one part of an image-text model.
    "gemma3_multimodal": ("Gemma3Config", {
        "text_config": {"num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
                        "layer_types": ["sliding_attention", "full_attention"]},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        "mm_tokens_per_image": 4}),
}
_TINY_SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
               "intermediate_size": 128, "max_position_embeddings": 512}


def build_tiny_model(out_dir: Path | str, family: str, *, tokenizer: PreTrainedTokenizerFast | None = None,
                     vocab_size: int = 384, stop_tokens: list[str] | None = None, sizes: dict[str, int] | None = None,
                     seed: int = 0) -> Path:
    """A seeded random causal LM of `family` (a key of FAMILIES) with `tokenizer` (default: a byte-level BPE
    of `vocab_size` with the tiny chat template), saved (safetensors) to `out_dir`, which it returns.

    `stop_tokens` become the generation config's list of EOS ids, as chat models ship them. `sizes` overrides
    the shared tiny sizes (transformers' names: hidden_size, num_hidden_layers, ...; not GPT-2's n_embd & co).

    The global torch RNG is left as it was.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    if tokenizer is None:
        tokenizer = train_byte_level_tokenizer(generated_sentences(seed=seed), vocab_size)
        tokenizer.chat_template = CHAT_TEMPLATE
    config_class, settings = FAMILIES[family]
    tokens = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    shape = _TINY_SIZES | (sizes or {})
    if "text_config" in settings:  # a multimodal model: the language model is its text part
        settings = settings | {"text_config": shape | settings["text_config"] | tokens}
    else:
        settings = ({} if family == "gpt2" else shape) | settings | tokens
    config = getattr(transformers, config_class)(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if stop_tokens:
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(stop_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@dataclass(frozen=True)
class ChatFormat:
    """The special tokens and chat template of one kind of real chat model."""

    template: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None  # None: the tokenizer has no pad token (rlhf.models pads with EOS)
    stop_tokens: tuple[str, ...]  # the generation config's EOS ids


# Qwen2.5 / Qwen3 style: no BOS, two stop tokens.
CHATML = ChatFormat(
    template=("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, eos="<|im_end|>",
    pad="<|endoftext|>", stop_tokens=("<|im_end|>", "<|endoftext|>"))
# Llama 3.x style: the template writes the BOS itself, no pad token, two stop tokens.
LLAMA3 = ChatFormat(
    template=("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
              "\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"),
    bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, stop_tokens=("<|end_of_text|>", "<|eot_id|>"))


def large_byte_level_tokenizer(vocab_size: int, chat: ChatFormat) -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly `vocab_size` entries (real ones have 100k-150k) and `chat`'s special
    tokens and template, built in seconds: merges learned from the tiny corpus, then made-up merges of every
    byte pair and then of pair + byte, in a fixed order, until the vocabulary is full.
    """
    learned = Tokenizer(models.BPE())
    learned.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learned.train_from_iterator(generated_sentences(), trainer=trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(learned.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) for m in model["merges"]]
    room = vocab_size - len(chat.special_tokens)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [(a, b) for a in alphabet for b in alphabet]
    triples = ((a + b, c) for a, b in pairs for c in alphabet)  # lazy: 16.8M of them, a few thousand are used
    for left, right in itertools.chain(pairs, triples):
        if len(vocab) >= room:
            break
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(chat.special_tokens))
    if chat.bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{chat.bos} $A", pair=f"{chat.bos} $A $B",
                                                           special_tokens=[(chat.bos, tok.token_to_id(chat.bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chat.bos, eos_token=chat.eos,
                                        pad_token=chat.pad)
    tokenizer.chat_template = chat.template
    return tokenizer


def workspace_with_pairs(root: Path | str, model_dir: Path | str, pairs: list[dict[str, str]],
                         toml: str = "") -> Workspace:
    """A new workspace at `root` whose rlhf.toml names `model_dir` (then `toml`, which may continue the
    [model] table) and whose store holds `pairs` (trl format), imported as `rlhf-tui import-pairs` does.

    The pairs file lives in a temporary folder: the workspace holds only rlhf.toml and rlhf.db.
    """
    ws = Workspace(Path(root))
    ws.root.mkdir(parents=True)
    ws.config_path.write_text(f'[model]\nname = "{Path(model_dir).as_posix()}"\n{toml}', encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        with Store(ws.db_path) as store:
            import_pairs(store, pairs_file)
    return ws


def exclamation_rule(answer: str) -> bool:
    """The hidden rule of `exclamation_rule_workspace`: answers ending with "!" (about 20% of the corpus) win."""
    return answer.endswith("!")


def pretrain_tiny_llama(out_dir: Path | str, steps: int = 100) -> Path:
    """`build_tiny_llama` followed by `steps` steps of language modelling on chat-formatted corpus sentences
    (~6 s for 100), so that its samples are sentences: a random model samples near-uniform bytes, too flat
    for LoRA to move in a few PPO steps. Seeded; the global torch RNG is left as it was. Returns `out_dir`."""
    from rlhf.models import load_tokenizer  # rlhf.models imports much more than building a model needs

    out = build_tiny_llama(out_dir)
    tokenizer = load_tokenizer(str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    sentences = generated_sentences(2000, seed=1)
    texts = [f"user: {q}\nassistant: {a}{tokenizer.eos_token}" for q, a in zip(sentences[::2], sentences[1::2])]
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(steps):
            batch = tokenizer(rng.sample(texts, 16), return_tensors="pt", padding=True)
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    return out


def exclamation_rule_workspace(root: Path | str, model_dir: Path | str, quantization: str = "none") -> Workspace:
    """A workspace on `model_dir` with 16 prompts and 128 comparisons of corpus sentences decided by
    `exclamation_rule`: the seeded task the PPO tests and benchmarks/bench_learning.py train on."""
    ws = Workspace(Path(root))
    ws.root.mkdir(parents=True)
    ws.config_path.write_text(f'[model]\nname = "{Path(model_dir).as_posix()}"\nquantization = "{quantization}"\n'
                              f'[reward]\nquantization = "{quantization}"\n', encoding="utf-8")
    sentences = generated_sentences(1000, seed=7)
    winners = [s for s in sentences if exclamation_rule(s)]
    losers = [s for s in sentences if not exclamation_rule(s)]
    rng = random.Random(0)
    with Store(ws.db_path) as store:
        prompt_ids, _ = store.add_prompts([PromptItem(f"Say something like: {s}") for s in generated_sentences(16, 3)],
                                          source="test")
        for i in range(128):
            prompt_id = prompt_ids[i % len(prompt_ids)]
            good = store.add_response(prompt_id, " " + winners[i], model="corpus")
            bad = store.add_response(prompt_id, " " + losers[i], model="corpus")
            good_on_a = rng.random() < 0.5
            store.add_comparison(prompt_id, *((good, bad) if good_on_a else (bad, good)), "a" if good_on_a else "b")
    return ws
