"""Active pair selection and the reward model's view of served pairs (rlhf/active.py): the selection formulas
by hand, then the engine in this process on the tiny Llama with a reward run trained on it: served pairs carry
the reward model's scores (the same as `rlhf-tui score`'s), the labeling samples do not change, a decision
stores the margin, `selection = "uncertain"` serves the least sure of its candidates, and `repeat_every`
re-shows a labeled pair with its sides swapped."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.active import is_repeat_turn, least_sure, pair_uncertainty
from rlhf.config import Workspace
from rlhf.engine import protocol
from rlhf.store import PromptItem, Store

SETTINGS = """
[reward]
epochs = 1
batch_size = 4
heldout_fraction = 0.25
[sampling]
max_new_tokens = 8
"""


# -- formulas --------------------------------------------------------------------------------------


def test_pair_uncertainty_by_hand():
    assert pair_uncertainty([0.5]) == -0.5 and pair_uncertainty([-2.0]) == -2.0  # one model: -|margin|
    assert pair_uncertainty([1.0, -1.0]) == 1.0  # spread 2 / 2 - |mean 0|: they disagree on the side
    assert pair_uncertainty([2.0, 1.0]) == -1.0  # 1 / 2 - 1.5: both sure of side A
    with pytest.raises(ValueError):
        pair_uncertainty([])


def test_least_sure_picks_the_highest_uncertainty_first_on_ties():
    assert least_sure([[2.0], [-0.1], [0.3]]) == 1
    assert least_sure([[0.2], [-0.2]]) == 0
    assert least_sure([[2.0, 1.5], [1.0, -1.0], [0.1, 0.1]]) == 1  # disagreement beats a small shared margin


def test_is_repeat_turn_every_nth():
    assert [is_repeat_turn(served, 3) for served in range(7)] == [False, False, True, False, False, True, False]
    assert not any(is_repeat_turn(served, 0) for served in range(10))


# -- the engine, in this process -------------------------------------------------------------------


class Events:
    """The engine's outbox, kept in a list."""

    def __init__(self) -> None:
        self.sent: list[protocol.Event] = []

    def send(self, event: protocol.Event) -> None:
        self.sent.append(event)

    def pairs(self) -> list[protocol.PairReady]:
        return [e for e in self.sent if isinstance(e, protocol.PairReady)]


@pytest.fixture(scope="module")
def rewarded(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Workspace, str]:
    """A workspace on the tiny Llama with a finished reward run and ten prompts to label."""
    from rlhf.reward import train_reward
    from tools.tiny import hidden_rule_pairs, workspace_with_pairs

    ws = workspace_with_pairs(tmp_path_factory.mktemp("active") / "ws", tiny_model_dir,
                              hidden_rule_pairs(num_prompts=8, pairs_per_prompt=2), SETTINGS)
    result = train_reward(ws, ws.load_config())
    assert result.status == "finished", result.message
    with Store(ws.db_path) as store:
        store.add_prompts([PromptItem(f"Tell me about boats ({i}).") for i in range(10)], source="test")
    return ws, result.run_id


def engine_on(ws: Workspace, label: dict[str, object]):
    from rlhf.engine.worker import Engine

    events = Events()
    engine = Engine(ws, ws.load_config().override({f"label.{k}": v for k, v in label.items()}), events)
    engine._load()
    return engine, events


def ask_pairs(engine, count: int) -> None:
    """A NeedPairs answered whole, as the engine's loop does one pair at a time."""
    request = protocol.NeedPairs(count)
    while request is not None:
        request = engine.answer_pair_request(request, engine.labeling_source())


def test_served_pairs_carry_the_reward_models_scores_and_the_decision_its_margin(rewarded):
    from rlhf.reward_model import RewardScorer
    from rlhf.sampling import PairSampler

    ws, reward_run = rewarded
    engine, events = engine_on(ws, {})
    ask_pairs(engine, 2)
    pairs = events.pairs()
    assert len(pairs) == 2 and all(p.reward_run == reward_run for p in pairs)

    scorer = RewardScorer.from_run(ws, reward_run)  # the reward model on a base of its own, as `score` loads it
    for pair in pairs:
        assert list(pair.reward_scores) == pytest.approx(scorer.score_many(
            [(pair.prompt_text, pair.a.text), (pair.prompt_text, pair.b.text)]), abs=1e-5)

    # The reward adapter rides on the labeling model but stays off while it samples: the same answers as the base.
    from rlhf.models import load_causal_lm

    base = PairSampler(load_causal_lm(engine.model_name).eval(), engine.sampler.tokenizer, engine.cfg.sampling,
                       engine.cfg.model.max_prompt_tokens)
    first = pairs[0]
    again = base.sample(first.prompt_text, None, prompt_id=first.prompt_id, draw=0)
    assert sorted(a.text for a in again.answers) == sorted((first.a.text, first.b.text))

    store = engine.store
    store.add_comparison(first.prompt_id, first.a.id, first.b.id, "b")
    (verdict,) = store.reward_margins(5)
    assert verdict["reward_run"] == reward_run
    assert verdict["reward_margin"] == pytest.approx(first.reward_scores[1] - first.reward_scores[0])


def test_uncertain_selection_serves_the_least_sure_of_its_candidates(rewarded):
    ws, reward_run = rewarded
    engine, events = engine_on(ws, {"selection": "uncertain", "candidates": 3})
    before = engine.store.stats()["responses"]
    ask_pairs(engine, 1)
    (served,) = events.pairs()
    assert engine.store.stats()["responses"] == before + 6  # three candidate pairs sampled and stored
    rows = engine.store._query("SELECT r.id, r.prompt_id, r.sampling, s.score FROM responses r JOIN "
                               "response_scores s ON s.response_id = r.id WHERE r.id > ? ORDER BY r.id", [before])
    margins = {}
    for row in rows:
        margins.setdefault(row["prompt_id"], []).append(row["score"])
    assert len(margins) == 3
    assert abs(served.reward_scores[0] - served.reward_scores[1]) == \
        pytest.approx(min(abs(a - b) for a, b in margins.values()))
    assert '"selection": "uncertain"' in rows[0]["sampling"] and reward_run in rows[0]["sampling"]


def test_repeat_every_shows_a_labeled_pair_again_with_sides_swapped(rewarded):
    ws, _ = rewarded
    engine, events = engine_on(ws, {"repeat_every": 2})
    ask_pairs(engine, 1)
    (first,) = events.pairs()
    assert first.repeat_of is None
    engine.store.add_comparison(first.prompt_id, first.a.id, first.b.id, "a")
    ask_pairs(engine, 2)  # the 2nd pair served is a repeat, the 3rd a fresh one again
    repeat, fresh = events.pairs()[1:]
    labeled = {c["id"]: c for c in engine.store.comparisons() if c["source"] == "label"}
    original = labeled[repeat.repeat_of]
    assert (repeat.a.id, repeat.b.id) == (original["response_b_id"], original["response_a_id"])
    assert repeat.prompt_id == original["prompt_id"] and fresh.repeat_of is None
    repeated = engine.store.add_comparison(repeat.prompt_id, repeat.a.id, repeat.b.id, "b", repeat_of=repeat.repeat_of)
    last = engine.store.labeled_decisions()[-1]
    assert (last["id"], last["repeat_of"]) == (repeated, original["id"])


def test_a_reward_run_that_cannot_load_judges_nothing_and_labeling_goes_on(rewarded):
    ws, reward_run = rewarded
    with Store(ws.db_path) as store:  # a newer finished reward run whose files are gone
        broken = store.create_run("reward", {})
        store.update_run(broken, status="finished")
    engine, events = engine_on(ws, {"uncertainty_runs": 2, "selection": "uncertain", "candidates": 2})
    warnings = [e.message for e in events.sent if isinstance(e, protocol.Warning)]
    assert warnings == [f"reward run {broken} does not judge labeling pairs: {ws.run_dir(broken) / 'reward'}: no "
                        "trained reward model here (missing reward.json); train one with `rlhf-tui train-reward`"]
    ask_pairs(engine, 1)
    (pair,) = events.pairs()
    assert pair.reward_run == reward_run  # the older run still judges
    engine.store.update_run(broken, status="failed")  # the module's workspace stays as the other tests know it


def test_a_repeat_due_before_anything_is_labeled_comes_with_the_next_pair_after_a_decision(workspace, store):
    """Prefetched pairs are made before the person labels the ones ahead of them: a repeat whose turn finds no
    decision to repeat is served as soon as there is one."""
    store.add_prompts([PromptItem(f"Tell me about cakes ({i}).") for i in range(4)], source="test")
    engine, events = engine_on(workspace, {"repeat_every": 2})
    ask_pairs(engine, 2)  # the app's first request: the pair shown and one prefetched; the 2nd is due, nothing labeled
    first, second = events.pairs()
    assert second.repeat_of is None
    comparison = engine.store.add_comparison(first.prompt_id, first.a.id, first.b.id, "a")
    ask_pairs(engine, 2)
    repeat, fresh = events.pairs()[2:]
    assert (repeat.repeat_of, repeat.a.id, repeat.b.id, fresh.repeat_of) == (comparison, first.b.id, first.a.id, None)
