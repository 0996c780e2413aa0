"""Real-world tokenizers: 128k and 151k-entry byte-level BPEs with the chat templates and stop tokens of
Llama 3 and of Qwen (ChatML), models whose generation config lists several EOS ids, and Unicode text.

The models are tiny random Llamas "steered" in memory (see `steer`) so that every position predicts one
known next-token distribution: stop tokens and other special tokens come up at rates the tests choose.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import Config
from rlhf.data_io import export_pairs, import_pairs, import_prompts
from rlhf.lora import lora_config
from rlhf.models import encode_prompt, eos_token_ids, format_prompt, load_causal_lm, load_tokenizer
from rlhf.ppo_trainer import PPOTrainer, PreparedPrompt, ValueHead
from rlhf.sampling import PairSampler
from rlhf.store import Store
from tools.tiny import CHATML, LLAMA3, ChatFormat, build_tiny_model, large_byte_level_tokenizer

# Llama 3's and Qwen2.5's vocabulary sizes.
FORMATS = {"llama3": (LLAMA3, 128_256), "chatml": (CHATML, 151_646)}
# CJK, emoji with a skin-tone modifier and a ZWJ family, a decomposed accent (e + U+0301, kept as is: no
# normalisation), Arabic, a flag.
UNICODE = ["日本語の質問です。", "你好，世界！", "👋🏽 hi 👨‍👩‍👧", "cafe\u0301 vs café", "مرحبا بالعالم", "🇯🇵 and ｆｕｌｌｗｉｄｔｈ"]


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory) -> Callable[[str], Path]:
    """Each chat format's tiny Llama with its large vocabulary, built on first use (~3 s each)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            chat, size = FORMATS[name]
            built[name] = build_tiny_model(tmp_path_factory.mktemp(name), "llama",
                                           tokenizer=large_byte_level_tokenizer(size, chat),
                                           stop_tokens=list(chat.stop_tokens))
        return built[name]

    return get


def steer(model: PreTrainedModel, probs: dict[int, float]) -> None:
    """Make every position predict one distribution: `probs` for the listed token ids, the rest of the mass
    spread evenly over all other ids.

    All input embeddings become one vector, so attention averages identical values and every position ends in
    the same final hidden state h; LM-head row i becomes h * l_i / |h|^2 (logit l_i) for a listed id, else 0.
    """
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.copy_(embeddings[:1].expand_as(embeddings))
        h = model.get_decoder()(input_ids=torch.zeros((1, 1), dtype=torch.long)).last_hidden_state[0, -1]
        head = model.get_output_embeddings().weight
        head.zero_()
        others, rest = head.shape[0] - len(probs), 1.0 - sum(probs.values())
        for token, p in probs.items():
            head[token] = h * math.log(p * others / rest) / h.dot(h)


def _ids(tokenizer, tokens) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(tokens))


def _steered(model_dir: Path, chat: ChatFormat, stop: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model predicting `stop` (or, for None, each stop token) 30% of the time and a special token that is
    not a stop token 20%."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir))
    stops = [stop] if stop else list(chat.stop_tokens)
    not_a_stop = next(t for t in chat.special_tokens if t not in chat.stop_tokens and t != chat.bos)
    probs = {i: 0.3 / len(stops) for i in _ids(tokenizer, stops)}
    steer(model, probs | {tokenizer.convert_tokens_to_ids(not_a_stop): 0.2})
    return model, tokenizer


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_real_sized_vocabulary_round_trips_unicode_and_keeps_special_tokens_whole(chat_models, name):
    chat, size = FORMATS[name]
    tokenizer = load_tokenizer(str(chat_models(name)))
    assert len(tokenizer) == size
    for text in UNICODE:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    for token in chat.special_tokens:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]


@pytest.mark.parametrize("name", list(FORMATS))
def test_chat_prompt_has_at_most_one_bos_and_the_eos_ids_are_the_generation_configs_list(chat_models, name):
    chat, _ = FORMATS[name]
    model_dir = chat_models(name)
    tokenizer = load_tokenizer(str(model_dir))
    formatted = format_prompt(tokenizer, UNICODE[0])
    ids = encode_prompt(tokenizer, formatted)
    bos = tokenizer.bos_token_id
    assert ids.count(bos) == (0 if chat.bos is None else 1) and (bos is None or ids[0] == bos)
    assert tokenizer.decode(ids) == formatted
    assert eos_token_ids(load_causal_lm(str(model_dir)), tokenizer) == _ids(tokenizer, chat.stop_tokens)
    assert tokenizer.pad_token_id is not None  # Llama 3 has none: rlhf.models pads with its EOS


def test_the_tokenizers_eos_ends_answers_even_when_the_generation_config_leaves_it_out(chat_models):
    model_dir = chat_models("chatml")
    tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir))
    end_of_text, im_end = _ids(tokenizer, ["<|endoftext|>", "<|im_end|>"])
    model.generation_config.eos_token_id = end_of_text  # a base model's config; the template ends turns with im_end
    assert eos_token_ids(model, tokenizer) == [end_of_text, im_end]
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model, tokenizer) == [im_end]


@pytest.mark.parametrize("name,stop", [(n, s) for n, (c, _) in FORMATS.items() for s in c.stop_tokens])
def test_labeling_answers_end_at_each_stop_token_and_no_special_token_reaches_the_db_or_an_export(
        chat_models, name, stop, tmp_path):
    chat, _ = FORMATS[name]
    model, tokenizer = _steered(chat_models(name), chat, stop)
    cfg = Config().override({"sampling.max_new_tokens": 64, "sampling.max_resample": 0})
    sampler = PairSampler(model, tokenizer, cfg.sampling, max_prompt_tokens=256)
    with Store(tmp_path / "rlhf.db") as store:
        prompt_file = tmp_path / "prompts.txt"
        prompt_file.write_text(UNICODE[0] + "\n", encoding="utf-8")
        import_prompts(store, prompt_file)
        prompt = store.prompts()[0]
        answers, response_ids = [], []
        for draw in range(4):  # stored as the engine stores them, then labeled
            pair = sampler.sample(prompt["text"], prompt["messages"], prompt_id=prompt["id"], draw=draw)
            answers += pair.answers
            ids = [store.add_response(prompt["id"], a.text, model="steered", response_tokens=a.tokens,
                                      finished=a.finished) for a in pair.answers]
            store.add_comparison(prompt["id"], ids[0], ids[1], "a")
            response_ids += ids
        # P(no stop in 64 tokens) = 0.7^64, about 1e-10: every answer ends at the one stop token there is.
        assert all(a.finished and a.tokens < 64 for a in answers)
        assert sum(a.tokens for a in answers) > 0
        stored = [store.response(i)["text"] for i in response_ids]
        export = tmp_path / "pairs.jsonl"
        export_pairs(store, export)
    exported = export.read_text(encoding="utf-8")
    for token in chat.special_tokens:
        assert all(token not in a.text for a in answers)
        assert all(token not in text for text in stored)
        assert token not in exported


@pytest.mark.parametrize("name", list(FORMATS))
def test_ppo_masks_end_each_response_at_its_first_stop_token_whichever_it_is(chat_models, name):
    from peft import get_peft_model

    chat, _ = FORMATS[name]
    model, tokenizer = _steered(chat_models(name), chat, None)
    cfg = Config().override({"ppo.batch_size": 16, "ppo.max_new_tokens": 24, "ppo.temperature": 1.0}).ppo
    peft_model = get_peft_model(model, lora_config(model, r=4, alpha=8, dropout=0.0), adapter_name="policy")
    trainer = PPOTrainer(peft_model, ValueHead(model.config.hidden_size), reward=None, tokenizer=tokenizer, cfg=cfg)
    prompt_ids = encode_prompt(tokenizer, format_prompt(tokenizer, UNICODE[1]))
    torch.manual_seed(0)
    rollout = trainer.rollout([PreparedPrompt(i, UNICODE[1], None, prompt_ids) for i in range(16)])

    stop_ids = set(_ids(tokenizer, chat.stop_tokens))
    ended_by = set()
    for row, tokens in enumerate(rollout.response_ids.tolist()):
        first_stop = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
        length = len(tokens) if first_stop is None else first_stop + 1
        assert rollout.response_mask[row].tolist() == [i < length for i in range(len(tokens))]
        answer_length = length if first_stop is None else first_stop
        assert rollout.answer_mask[row].tolist() == [i < answer_length for i in range(len(tokens))]
        assert bool(rollout.has_eos[row]) == (first_stop is not None)
        if first_stop is not None:
            ended_by.add(tokens[first_stop])
    assert ended_by == stop_ids  # both stop tokens ended some response
    for text in rollout.response_texts:
        assert not any(token in text for token in chat.special_tokens)


def test_unicode_round_trips_through_prompt_import_pair_import_and_every_export(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}, ensure_ascii=False) + "\n" for t in UNICODE),
                       encoding="utf-8")
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\n" + "".join(f'"{t}"\n' for t in reversed(UNICODE)), encoding="utf-8")
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(UNICODE) + "\n", encoding="utf-8")
    pairs = [{"prompt": UNICODE[i], "chosen": UNICODE[(i + 1) % len(UNICODE)],
              "rejected": UNICODE[(i + 2) % len(UNICODE)] + " 🙂"} for i in range(len(UNICODE))]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")  # \u escapes

    for source in (prompts, csv, text):
        with Store(tmp_path / f"{source.suffix[1:]}.db") as store:
            import_prompts(store, source)
            assert sorted(row["text"] for row in store.prompts()) == sorted(UNICODE)

    with Store(tmp_path / "pairs.db") as store:
        import_pairs(store, pairs_file)
        for fmt in ("trl", "messages", "openai"):
            export_pairs(store, tmp_path / f"{fmt}.jsonl", fmt)
    assert [json.loads(line) for line in (tmp_path / "trl.jsonl").read_text(encoding="utf-8").splitlines()] == pairs
    # An export imports back as the same pairs (the messages format too).
    with Store(tmp_path / "again.db") as store:
        import_pairs(store, tmp_path / "messages.jsonl")
        again = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                 for p in store.preference_pairs()]
    assert again == pairs
    openai = [json.loads(line) for line in (tmp_path / "openai.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["preferred_output"][0]["content"] for o in openai] == [p["chosen"] for p in pairs]
