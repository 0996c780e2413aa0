"""Reward model: loss formulas by hand, then training through `train_reward` on the tiny Llama.

The end-to-end data follows a hidden rule (tools.tiny.hidden_rule_pairs): both answers fill the same
three adjective slots of one sentence shape and the one that says "good" more often wins. Held-out
pairwise accuracy must reach 0.85 (chance is 0.5). That is reachable because a single token's
count separates the answers and attention can pool it into the last position; trl's RewardTrainer
gets ~0.97 on such pairs, and we measured 0.97 (none) and 1.00 (4bit) on this exact set. 4-bit uses
the same bar: NF4 only quantizes the frozen base, while the trained LoRA and score head stay fp32.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import rlhf.reward as reward
from rlhf.config import Config, Workspace
from rlhf.errors import RlhfError
from rlhf.hooks import RunHooks
from rlhf.models import load_causal_lm, load_sequence_classifier, load_tokenizer
from rlhf.bradley_terry import (batch_metrics, bradley_terry_loss, centering_penalty, pairwise_accuracy, reward_loss,
                                symmetric_tie_loss)
from rlhf.reward import train_reward
from rlhf.reward_model import (RewardScorer, encode_response, export_sequence_classifier, load_reward_onto,
                               reward_tokenizer_matches, standardise)
from rlhf.reward_pairs import is_heldout
from rlhf.tokens import fit_to_length, pad_left
from rlhf.store import Store
from tools.tiny import build_tiny_llama, hidden_rule_pairs, workspace_with_pairs

ACCURACY_BAR = 0.85
t = torch.tensor


def _log1p_exp(x: float) -> float:
    """-log sigmoid(-x), written out for hand checks."""
    return math.log1p(math.exp(x))


# -- formulas --------------------------------------------------------------------------------


def test_bradley_terry_loss_hand_numbers():
    # -log sigmoid(d) = log(1 + e^-d): d = 1 -> 0.313262, d = 0 -> log 2 = 0.693147
    assert torch.allclose(bradley_terry_loss(t([1.0, 0.0]), t([0.0, 0.0])), t([0.313262, 0.693147]), atol=1e-6)
    # the margin is subtracted: d = 1 - 0.5 = 0.5 -> 0.474077; d = 0 - (-1) = 1 -> 0.313262
    assert torch.allclose(bradley_terry_loss(t([1.0, 0.0]), t([0.0, 0.0]), t([0.5, -1.0])),
                          t([0.474077, 0.313262]), atol=1e-6)


def test_symmetric_tie_loss_is_smallest_at_equal_rewards():
    # (log(1 + e^-1) + log(1 + e^1)) / 2 = (0.313262 + 1.313262) / 2 = 0.813262
    assert torch.allclose(symmetric_tie_loss(t([1.0, 0.0]), t([0.0, 0.0])), t([0.813262, 0.693147]), atol=1e-6)
    assert torch.allclose(symmetric_tie_loss(t([3.0]), t([1.0])), symmetric_tie_loss(t([1.0]), t([3.0])))


def test_centering_penalty_hand_numbers():
    # 0.01 * mean((1 + 1)^2, (2 + 0)^2) = 0.01 * 4
    assert centering_penalty(t([1.0, 2.0]), t([1.0, 0.0]), 0.01).item() == pytest.approx(0.04)


def test_reward_loss_mixes_pairs_ties_and_centering():
    # pair 1 decided: -log sigmoid(2 - 0 - 1) = 0.313262; pair 2 a tie (margin ignored): 0.813262
    # mean 0.563262, plus 0.1 * mean(2^2, 1^2) = 0.25
    loss = reward_loss(t([2.0, 0.0]), t([0.0, 1.0]), margin=t([1.0, 5.0]), is_tie=t([False, True]),
                       center_coef=0.1)
    assert loss.item() == pytest.approx(0.563262 + 0.25, abs=1e-6)
    assert reward_loss(t([2.0]), t([0.0])).item() == pytest.approx(_log1p_exp(-2.0), abs=1e-6)


def test_pairwise_accuracy_and_standardise():
    assert pairwise_accuracy(t([1.0, 2.0, 3.0]), t([0.0, 2.0, 4.0])) == pytest.approx(1 / 3)  # a draw is wrong
    assert math.isnan(pairwise_accuracy(t([]), t([])))
    assert torch.allclose(standardise(t([1.0, 3.0]), mean=2.0, std=0.5), t([-2.0, 2.0]))


def test_batch_metrics_hand_numbers():
    # decided pairs 1 and 3: margins 1 and -1 -> mean 0, one of two right; the tie counts only in the means
    metrics = batch_metrics(t([2.0, 0.5, 0.0]), t([1.0, 0.5, 1.0]), t([False, True, False]))
    assert metrics == pytest.approx({"margin_mean": 0.0, "chosen_mean": 2.5 / 3, "rejected_mean": 2.5 / 3,
                                     "train_acc": 0.5})
    assert batch_metrics(t([1.0]), t([0.0]), t([True])) == {"chosen_mean": 1.0, "rejected_mean": 0.0}  # all ties


def test_heldout_split_is_deterministic_by_prompt_and_seed():
    held = {i for i in range(2000) if is_heldout(i, seed=0, fraction=0.3)}
    assert 0.27 < len(held) / 2000 < 0.33
    assert held == {i for i in range(2000) if is_heldout(i, seed=0, fraction=0.3)}
    assert held != {i for i in range(2000) if is_heldout(i, seed=1, fraction=0.3)}
    assert not any(is_heldout(i, 0, 0.0) for i in range(100))


def test_fit_to_length_cuts_the_prompt_from_the_left():
    assert fit_to_length([1, 2, 3], [4, 5], 10) == ([1, 2, 3, 4, 5], False)
    assert fit_to_length([1, 2, 3, 4, 5], [6, 7], 5) == ([3, 4, 5, 6, 7], True)
    # a response longer than the budget keeps its start and one prompt token before it
    assert fit_to_length([1, 2], [3, 4, 5, 6, 7, 8, 9], 4) == ([2, 3, 4, 5], True)


# -- end to end ------------------------------------------------------------------------------


def _workspace(root: Path, model_dir: Path, pairs: list[dict], **settings) -> tuple[Workspace, Config]:
    reward_settings = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    ws = workspace_with_pairs(root, model_dir, pairs, f"[reward]\nheldout_fraction = 0.2\n{reward_settings}")
    return ws, ws.load_config()


class StopAfter(RunHooks):
    """Asks to stop once `steps` training steps have been reported."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.seen: list[int] = []

    def on_step(self, run_id, step, metrics):
        if "loss" in metrics:
            self.seen.append(step)
            if len(self.seen) >= self.steps:
                self.stop_requested.set()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One full-precision training run on 200 hidden-rule pairs, shared by the tests that read it."""
    ws, cfg = _workspace(tmp_path_factory.mktemp("reward") / "ws", tiny_model_dir, hidden_rule_pairs(50, 4))
    return ws, cfg, train_reward(ws, cfg)


def _train_responses(ws: Workspace, cfg: Config) -> list[tuple[str, str]]:
    with Store(ws.db_path) as store:
        pairs = store.preference_pairs()
    train = [p for p in pairs if not is_heldout(p["prompt_id"], cfg.reward.seed, cfg.reward.heldout_fraction)]
    return [(p["prompt"], text) for p in train for text in (p["chosen"], p["rejected"])]


def test_hidden_rule_is_learned_full_precision(trained):
    ws, cfg, result = trained
    assert result.status == "finished"
    meta = json.loads((Path(result.checkpoint) / "reward.json").read_text())
    assert meta["heldout_acc"] >= ACCURACY_BAR
    assert meta["counts"]["heldout"] >= 20 and meta["counts"]["pairs"] == 200
    with Store(ws.db_path) as store:
        run = store.run(result.run_id)
        heldout = [m["value"] for m in store.metrics(result.run_id, "heldout_acc")]
        losses = [m["value"] for m in store.metrics(result.run_id, "loss")]
        names = {m["name"] for m in store.metrics(result.run_id)}
    assert run.kind == "reward" and run.status == "finished" and run.step == run.total_steps
    assert run.checkpoint == result.checkpoint
    assert {"loss", "train_acc", "heldout_acc", "margin_mean", "chosen_mean", "rejected_mean"} <= names
    assert len(heldout) == cfg.reward.epochs + 1  # before training, then after each epoch
    assert heldout[-1] == meta["heldout_acc"] and heldout[0] < ACCURACY_BAR
    assert sum(losses[-5:]) < sum(losses[:5])


def test_saved_layout_and_normalisation(trained, tiny_model_dir):
    ws, cfg, result = trained
    out = Path(result.checkpoint)
    assert out == ws.run_dir(result.run_id) / "reward"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (out / "adapter").iterdir()}
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)  # LoRA weights only, no base weights
    assert load_file(str(out / "score_head.safetensors"))["weight"].shape == (1, 64)
    meta = json.loads((out / "reward.json").read_text())
    assert meta["base_model"] == str(tiny_model_dir) and meta["quantization"] == "none"
    assert meta["config"]["reward"]["heldout_fraction"] == 0.2 and meta["max_length"] == 512
    assert len(meta["data_hash"]) == 16 and meta["counts"]["truncated"] == 0
    # Standardised scores of the training responses, re-scored from the saved files: mean 0, std 1.
    scores = torch.tensor(RewardScorer.from_run(ws, result.run_id).score_many(_train_responses(ws, cfg)))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)


def test_shared_base_score_equals_standalone_score(trained, tiny_model_dir):
    ws, cfg, result = trained
    scorer = RewardScorer.from_run(ws, result.run_id)
    items = [("Tell me a story.", " A dog likes a good cake, a good tree and a good boat."),
             ("Hi", " The sun reads a cold book, a red song and a new tree."),
             ("What do you see over there by the river today?", " A cat.")]
    standalone = torch.tensor(scorer.score_many(items))
    alone = torch.tensor([scorer.score(p, r) for p, r in items])
    assert torch.allclose(standalone, alone, atol=1e-5)  # padding does not change a score

    tok = load_tokenizer(str(tiny_model_dir))
    policy = get_peft_model(load_causal_lm(str(tiny_model_dir)), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # a policy adapter that really changes the model, so using it by mistake shows
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    ids, mask = pad_left([encode_response(tok, p, r, 512)[0] for p, r in items], tok.pad_token_id, torch.device("cpu"))
    policy_logits = policy(input_ids=ids, attention_mask=mask).logits
    head = load_reward_onto(policy, ws.run_dir(result.run_id))
    shared = head.score(policy, ids, mask)
    assert torch.allclose(shared, standalone, atol=1e-5)
    assert policy.active_adapter == "default"
    assert torch.allclose(policy(input_ids=ids, attention_mask=mask).logits, policy_logits)
    flags = {name: p.requires_grad for name, p in policy.named_parameters() if "lora_" in name}
    assert all(flags[n] for n in flags if ".default." in n) and not any(flags[n] for n in flags if ".reward." in n)


def test_reward_tokenizer_matches(trained, tiny_model_dir, tmp_path):
    ws, _, result = trained
    assert reward_tokenizer_matches(ws.run_dir(result.run_id), load_tokenizer(str(tiny_model_dir)))
    other = load_tokenizer(str(build_tiny_llama(tmp_path / "other", vocab_size=300)))
    assert not reward_tokenizer_matches(ws.run_dir(result.run_id), other)


def test_hidden_rule_is_learned_in_4bit(tmp_path, tiny_model_dir):
    ws, cfg = _workspace(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(50, 4), quantization="4bit")
    result = train_reward(ws, cfg)
    meta = json.loads((Path(result.checkpoint) / "reward.json").read_text())
    assert result.status == "finished" and meta["quantization"] == "4bit"
    assert meta["heldout_acc"] >= ACCURACY_BAR
    import bitsandbytes as bnb

    scorer = RewardScorer.from_run(ws, result.run_id)  # loads the base in 4-bit again, as trained
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in scorer.model.modules())
    assert scorer.score("Hi", " A dog likes a good cake, a good tree and a good boat.") > scorer.score(
        "Hi", " A dog likes a cold cake, a red tree and a new boat.")


def test_too_few_pairs_says_how_many_more(tmp_path, tiny_model_dir):
    pairs = hidden_rule_pairs(1, 3) + [{"prompt": "same", "chosen": " twin", "rejected": " twin"}]
    ws, cfg = _workspace(tmp_path / "ws", tiny_model_dir, pairs)
    with pytest.raises(RlhfError, match=r"only 3 usable preference pairs, .* at least 8: label 5 more"):
        train_reward(ws, cfg)
    with Store(ws.db_path) as store:
        assert store.runs() == []


def test_reward_base_with_another_tokenizer_is_refused(tmp_path, tiny_model_dir):
    other = build_tiny_llama(tmp_path / "other", vocab_size=300)
    ws, cfg = _workspace(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(4, 3), base=str(other))
    with pytest.raises(RlhfError, match="has a different tokenizer than the policy"):
        train_reward(ws, cfg)


def test_stop_keeps_a_loadable_adapter(tmp_path, tiny_model_dir):
    ws, cfg = _workspace(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(10, 4))
    hooks = StopAfter(3)
    result = train_reward(ws, cfg, hooks=hooks)
    assert result.status == "stopped" and result.step == 3 and hooks.seen == [1, 2, 3]
    with Store(ws.db_path) as store:
        run = store.run(result.run_id)
    assert run.status == "stopped" and run.ended_at and run.checkpoint == result.checkpoint
    assert math.isfinite(RewardScorer.from_run(ws, result.run_id).score("Hi", " A good boat."))


def _saved_weights(result) -> dict[str, torch.Tensor]:
    folder = Path(result.checkpoint)
    return {**load_file(folder / "adapter" / "adapter_model.safetensors"),
            **load_file(folder / "score_head.safetensors")}


class Warnings(RunHooks):
    """Keeps every warning a run reports."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def on_warning(self, run_id, message):
        self.messages.append(message)


def test_a_stopped_run_resumes_to_the_very_model_an_unbroken_run_trains(tmp_path, tiny_model_dir):
    settings = {"epochs": 3, "checkpoint_every": 3, "lora_dropout": 0.1}  # dropout: the RNG state must come back too
    ws_a, cfg_a = _workspace(tmp_path / "a", tiny_model_dir, hidden_rule_pairs(10, 4), **settings)
    unbroken = train_reward(ws_a, cfg_a)
    per_epoch = unbroken.step // 3
    ws, cfg = _workspace(tmp_path / "b", tiny_model_dir, hidden_rule_pairs(10, 4), **settings)
    stop_at = per_epoch + 2  # mid-epoch 2, after a mid-epoch and an epoch-end checkpoint
    stopped = train_reward(ws, cfg, hooks=StopAfter(stop_at))
    checkpoints = ws.run_dir(stopped.run_id) / "checkpoints"
    assert stopped.status == "stopped" and [p.name for p in checkpoints.iterdir()] == [f"step-{stop_at}"]
    with Store(ws.db_path) as store:
        assert store.run(stopped.run_id).checkpoint_step == stop_at

    # The run keeps its own settings: the config passed in (1 epoch) is not used.
    resumed = train_reward(ws, cfg.override({"reward.epochs": 1}), resume_run=stopped.run_id)
    assert (resumed.run_id, resumed.status, resumed.step) == (stopped.run_id, "finished", unbroken.step)
    expected, got = _saved_weights(unbroken), _saved_weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    with Store(ws.db_path) as store:
        run, losses = store.run(resumed.run_id), store.metrics(resumed.run_id, "loss")
        heldout = [row["step"] for row in store.metrics(resumed.run_id, "heldout_acc")]
    assert run.status == "finished" and run.checkpoint == resumed.checkpoint and run.error is None
    assert [row["step"] for row in losses] == list(range(1, unbroken.step + 1))  # no step counted twice
    assert heldout == [0, per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert not checkpoints.exists()  # the finished model is whole: nothing is left to resume
    with pytest.raises(RlhfError, match=f"run '{resumed.run_id}' already finished its {unbroken.step} steps"):
        train_reward(ws, cfg, resume_run=resumed.run_id)


def test_gradient_checkpointing_trains_the_same_model(tmp_path, tiny_model_dir, monkeypatch):
    from rlhf import reward

    loaded = []

    def load_and_keep(*args, **kwargs):  # the real loader; the test looks at the model it returned
        loaded.append(load_causal_lm(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(reward, "load_causal_lm", load_and_keep)
    results = {}
    for on in (False, True):
        ws, cfg = _workspace(tmp_path / str(on), tiny_model_dir, hidden_rule_pairs(10, 4), epochs=1,
                             gradient_checkpointing=on)
        results[on] = _saved_weights(train_reward(ws, cfg))
        assert loaded[-1].is_gradient_checkpointing == on
    plain, checkpointed = results[False], results[True]
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_resume_trains_on_the_pairs_it_started_with(tmp_path, tiny_model_dir):
    ws, cfg = _workspace(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(10, 4), epochs=2)
    first, second = (train_reward(ws, cfg, hooks=StopAfter(2)) for _ in range(2))
    with Store(ws.db_path) as store:
        from rlhf.data_io import import_pairs

        extra = tmp_path / "extra.jsonl"
        extra.write_text("".join(json.dumps(p) + "\n" for p in hidden_rule_pairs(3, 2, seed=5)))
        import_pairs(store, extra)
    hooks = Warnings()
    resumed = train_reward(ws, cfg, hooks=hooks, resume_run=first.run_id)
    meta = json.loads((Path(resumed.checkpoint) / "reward.json").read_text())
    assert resumed.status == "finished" and meta["counts"]["pairs"] == 40
    assert "6 pairs labeled since this run started are not used by it" in hooks.messages[0]

    with Store(ws.db_path) as store:
        store.delete_comparison(store.preference_pairs()[0]["comparison_id"])  # an undone label
    with pytest.raises(RlhfError, match=f"the preference pairs run {second.run_id} trained on changed"):
        train_reward(ws, cfg, resume_run=second.run_id)
    with Store(ws.db_path) as store:
        assert store.run(second.run_id).status == "stopped"  # refused before anything changed
    (ws.run_dir(second.run_id) / "pairs.json").unlink()  # a run folder from elsewhere, or an older rlhf-tui
    with pytest.raises(RlhfError, match="no pairs.json .* it cannot resume; train a new reward model"):
        train_reward(ws, cfg, resume_run=second.run_id)


def test_non_finite_loss_fails_the_run_and_keeps_the_last_good_adapter(tmp_path, tiny_model_dir, monkeypatch):
    ws, cfg = _workspace(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(10, 4))
    real_loss, calls = reward.reward_loss, []

    def nan_on_third_step(*args, **kwargs):  # fault injection: the third batch's loss is NaN
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(reward, "reward_loss", nan_on_third_step)
    result = train_reward(ws, cfg)
    assert result.status == "failed" and result.step == 2
    assert "loss became nan at step 3; kept the weights from step 2" in result.message
    with Store(ws.db_path) as store:
        run = store.run(result.run_id)
    assert run.status == "failed" and run.error == result.message
    assert math.isfinite(RewardScorer.from_run(ws, result.run_id).score("Hi", " A good boat."))


def test_ties_and_truncation_are_counted_not_dropped(tmp_path, tiny_model_dir):
    pairs = hidden_rule_pairs(10, 2) + [{**p, "tie": True} for p in hidden_rule_pairs(4, 1, seed=1)]
    ws, cfg = _workspace(tmp_path / "ws", tiny_model_dir, pairs, use_ties=True, max_length=20, epochs=1)
    result = train_reward(ws, cfg)
    counts = json.loads((Path(result.checkpoint) / "reward.json").read_text())["counts"]
    assert result.status == "finished"
    assert counts["pairs"] == 24 and counts["ties"] == 4 and counts["train"] + counts["heldout"] == 24
    assert counts["truncated"] == 24  # every answer is ~17 tokens after a ~15-token prompt
    ws_no_ties, cfg_no_ties = _workspace(tmp_path / "ws2", tiny_model_dir, pairs, epochs=1)
    meta = json.loads((Path(train_reward(ws_no_ties, cfg_no_ties).checkpoint) / "reward.json").read_text())
    assert meta["counts"]["pairs"] == 20 and meta["counts"]["ties"] == 0


def test_a_batch_scores_each_item_as_alone_with_its_own_chat_prompt(trained):
    ws, _, result = trained
    scorer = RewardScorer.from_run(ws, result.run_id)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about boats"}]
    items = [("Hi", " A dog likes a good cake."), ("Tell me about boats", " A good boat, a cold tree and a red cake.")]
    batch = scorer.score_many(items, [None, chat])
    alone = [scorer.score(*items[0]), scorer.score(*items[1], chat)]
    assert batch == pytest.approx(alone, abs=1e-5) and alone[1] != pytest.approx(scorer.score(*items[1]), abs=1e-5)


def test_export_loads_as_a_sequence_classifier_that_scores_the_same(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel

    ws, _, result = trained
    out = export_sequence_classifier(ws.run_dir(result.run_id), tmp_path / "exported")
    tok = load_tokenizer(str(tiny_model_dir))
    classifier = PeftModel.from_pretrained(load_sequence_classifier(str(tiny_model_dir), pad_token_id=tok.pad_token_id),
                                           str(out)).eval()
    items = [("Hi", " A dog likes a good cake, a good tree and a good boat."), ("Tell me", " A cold boat.")]
    seqs = [encode_response(tok, p, r, 512)[0] for p, r in items]
    width = max(map(len, seqs))  # right padding: the classifier pools the last token before the padding
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logits = classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    norm = json.loads((out / "reward.json").read_text())["normalisation"]
    ours = torch.tensor(RewardScorer.from_run(ws, result.run_id).score_many(items))
    assert torch.allclose(standardise(logits, norm["mean"], norm["std"]), ours, atol=1e-5)
    assert logits[0] > logits[1]  # the hidden rule: "good" wins
    with pytest.raises(RlhfError, match="already exists and is not an empty folder"):
        export_sequence_classifier(ws.run_dir(result.run_id), out)


# -- command line ----------------------------------------------------------------------------


def test_cli_score_prints_the_standardised_score(trained, capsys):
    from rlhf.cli import main

    ws, _, result = trained
    prompt, response = "Hi", " A dog likes a good cake, a good tree and a good boat."
    assert main(["score", "--workspace", str(ws.root), "--reward", result.run_id, prompt, response]) == 0
    expected = RewardScorer.from_run(ws, result.run_id).score(prompt, response)
    assert capsys.readouterr().out == f"{expected:.4f}\n"
    assert main(["score", "--workspace", str(ws.root), prompt, response]) == 0  # latest finished run
    assert capsys.readouterr().out == f"{expected:.4f}\n"
    assert main(["score", "--workspace", str(ws.root), "--reward", "nope", prompt, response]) == 2
    assert capsys.readouterr().err.strip() == "rlhf-tui: error: no run 'nope' (see `rlhf-tui runs`)"


def test_cli_export_reward_writes_the_latest_run_once(trained, tmp_path, capsys):
    from rlhf.cli import main

    ws, _, result = trained
    out = tmp_path / "rm"
    assert main(["export-reward", "--workspace", str(ws.root), str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"reward run {result.run_id} exported to {out}: load it with ")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "reward.json"]
    assert main(["export-reward", "--workspace", str(ws.root), str(out)]) == 2  # never over an existing folder
    assert capsys.readouterr().err.strip() == (f"rlhf-tui: error: {out} already exists and is not an empty folder: "
                                               "name a new one")


def test_cli_train_reward_too_few_pairs_is_one_line(tmp_path, tiny_model_dir, capsys):
    from rlhf.cli import main

    ws, _ = _workspace(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(1, 2))
    assert main(["train-reward", "--workspace", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only 2 usable preference pairs" in err and "label 6 more" in err


def test_cli_ctrl_c_stops_training_and_keeps_the_adapter(tmp_path, tiny_model_dir):
    import signal
    import subprocess
    import sys

    ws, _ = _workspace(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(10, 4))
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "train-reward", "--workspace", str(ws.root),
                             "--epochs", "1000", "--quantization", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # off a terminal, a progress line comes with each held-out evaluation
        if line.startswith("[") and "heldout_acc" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopping after this step" in err and out.count("\n") == 1  # one summary line
    assert re.search(r": stopped at step \d+/\d+ \(\d+ of 1000 epochs\) in .*; held-out accuracy .*; saved .*"
                     r"; resume with `rlhf-tui train-reward --resume reward-\S+`$", out.strip()), out
    with Store(ws.db_path) as store:
        run = store.runs("reward")[0]
    assert run.status == "stopped" and run.step < run.total_steps
    assert math.isfinite(RewardScorer.from_run(ws, run.id).score("Hi", " A good boat."))


def test_the_reward_base_is_quantized_like_the_policy_base_unless_told_otherwise():
    """So that `[model] quantization = "4bit"` alone gives a reward model PPO can share its 4-bit base with."""
    four_bit = Config().override({"model.quantization": "4bit"})
    assert four_bit.reward.quantization == "model" and four_bit.reward_quantization == "4bit"
    assert four_bit.override({"reward.quantization": "none"}).reward_quantization == "none"
    assert Config().reward_quantization == "none"
