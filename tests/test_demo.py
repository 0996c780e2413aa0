"""The demo grammar, its style features, and the shipped demo model and prompts (data/demo)."""

from __future__ import annotations

import pytest

from tools.demo import (TrainSettings, answer_style_features, answer_token_loss, demo_prompts, encode_exchanges,
                       generate_corpus, learning_rate, length_grouped_batches, main)
from rlhf.errors import RlhfError
from rlhf.paths import demo_model_dir, demo_prompts_file

STYLE_FLAGS = ("is_polite", "is_curt", "on_topic", "has_closing", "is_hedged")


def test_corpus_is_deterministic_for_a_seed():
    assert generate_corpus(40, seed=3) == generate_corpus(40, seed=3)
    assert generate_corpus(40, seed=3) != generate_corpus(40, seed=4)


def test_corpus_spreads_every_style_dimension_independently():
    features = [answer_style_features(answer) for _, answer in generate_corpus(3000, seed=0)]

    def share(key, among=features):
        return sum(f[key] for f in among) / len(among)

    for flag in STYLE_FLAGS:
        assert 0.25 < share(flag) < 0.75, flag
    assert all(f["well_formed"] for f in features)
    assert not any(f["is_polite"] and f["is_curt"] for f in features)
    lengths = [f["sentences"] for f in features]
    assert min(lengths) == 1 and max(lengths) >= 6
    # Tone and rambling are drawn independently, so a rule on one does not imply the other.
    polite = [f for f in features if f["is_polite"]]
    curt = [f for f in features if f["is_curt"]]
    assert abs(share("on_topic", polite) - share("on_topic", curt)) < 0.06


def test_style_features_of_hand_written_answers():
    rambling = ("Happy to help. It might help to rinse the rice before you cook it. "
                "Speaking of which, my aunt loves mint tea. I hope this helps!")
    assert answer_style_features(rambling) == {
        "is_polite": True, "is_curt": False, "on_topic": False, "has_closing": True, "is_hedged": True,
        "well_formed": True, "sentences": 4, "length": 26,
    }
    curt = " Just rinse the rice before you cook it. Keep the lid on while it cooks. "
    assert answer_style_features(curt) == {
        "is_polite": False, "is_curt": True, "on_topic": True, "has_closing": False, "is_hedged": False,
        "well_formed": True, "sentences": 2, "length": 15,
    }
    garbled = answer_style_features("Wear a vegetable garden. That should do it.")
    assert garbled["has_closing"] and not garbled["well_formed"]
    assert answer_style_features("")["sentences"] == 0 and not answer_style_features("")["well_formed"]


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    settings = TrainSettings(steps=110, warmup_steps=10, lr=1e-3)
    assert learning_rate(0, settings) == pytest.approx(1e-4)
    assert learning_rate(9, settings) == pytest.approx(1e-3)
    assert learning_rate(10, settings) == pytest.approx(1e-3)
    assert learning_rate(60, settings) == pytest.approx(0.55e-3)  # half way: 0.1 + 0.9 * 0.5
    assert learning_rate(110, settings) == pytest.approx(1e-4)


def test_answer_token_loss_sums_labelled_tokens_over_a_fixed_normalizer():
    import math

    import torch

    # Position 0 predicts label 1 from logits (0, 0): ln 2. Position 1 predicts label 0 from
    # (ln 3, 0): p = 3/4, so ln 4/3. The last position predicts nothing; the first label is ignored.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    assert answer_token_loss(logits, labels, normalizer=4.0).item() == pytest.approx(math.log(8 / 3) / 4)


def test_length_grouped_batches_keep_every_example_once_and_group_lengths():
    examples = [([0] * n, 1) for n in (5, 1, 9, 2, 8, 3, 7, 4)]
    batches = length_grouped_batches(examples, batch_size=2, seed=0, group=2)
    assert sorted(len(ids) for batch in batches for ids, _ in batch) == sorted(len(ids) for ids, _ in examples)
    # Each group of 4 examples (5,1,9,2 and 8,3,7,4) is sorted, then cut in two.
    assert sorted(sorted(len(ids) for ids, _ in batch) for batch in batches) == [[1, 2], [3, 4], [5, 9], [7, 8]]


def test_build_rejects_zero_steps():
    with pytest.raises(RlhfError, match="--steps"):
        main(["build", "--steps", "0"])


def test_prompts_file_is_the_grammar_questions():
    lines = demo_prompts_file().read_text(encoding="utf-8").splitlines()
    assert lines == demo_prompts()
    assert len(set(lines)) == len(lines) >= 200 and all(line.strip() for line in lines)


@pytest.fixture(scope="module")
def demo_model():
    torch = pytest.importorskip("torch")
    from rlhf.models import load_causal_lm, load_tokenizer

    path = demo_model_dir()
    torch.set_num_threads(1)
    return load_causal_lm(str(path), device=torch.device("cpu")).eval(), load_tokenizer(str(path))


def test_shipped_model_is_small_safetensors():
    files = {f.name: f.stat().st_size for f in demo_model_dir().iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt")) for name in files)
    assert sum(files.values()) < 15 * 2**20


def test_chat_template_renders_what_the_model_was_trained_on(demo_model):
    _, tokenizer = demo_model
    question, answer = "How do I cook rice?", "Rinse the rice before you cook it."
    (trained, prompt_len), = encode_exchanges(tokenizer, [(question, answer)])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False)
    assert tokenizer(rendered)["input_ids"][:len(trained)] == trained
    assert trained[-1] == tokenizer.eos_token_id and prompt_len < len(trained) - 1


def test_shipped_model_writes_readable_answers_that_end_in_eos(demo_model):
    import torch

    from rlhf.models import encode_prompt, format_prompt

    model, tokenizer = demo_model
    # The longest answer in the training corpus is 94 tokens; about 1% of answers pass 64.
    torch.manual_seed(0)
    answers = []
    for question in demo_prompts()[::97]:
        ids = encode_prompt(tokenizer, format_prompt(tokenizer, question))
        output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=96,
                                num_return_sequences=4, pad_token_id=tokenizer.pad_token_id)
        for row in output[:, len(ids):].tolist():
            assert tokenizer.eos_token_id in row, tokenizer.decode(row)
            answers.append(tokenizer.decode(row[:row.index(tokenizer.eos_token_id)]))
    well_formed = sum(answer_style_features(a)["well_formed"] for a in answers)
    assert well_formed >= 0.75 * len(answers), answers
