"""The Eval screen driven by keys (Textual Pilot): pairs sampled by a real engine on the tiny model, labeled blind
with the Label keys, identities revealed at the end with the win rate and its interval."""

from __future__ import annotations

from textual.widgets import OptionList

from rlhf.config import Workspace
from rlhf.evaluation import plan_eval, prepare_eval
from rlhf.store import Store
from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens import TABS
from rlhf_tui.app.screens.eval import (REFERENCE_OPTION, EvalScreen, checkpoint_options, opponent_options,
                                       reveal_lines, session_options)
from rlhf_tui.app.screens.label import MIN_LOOK_MS, event_clock
# The fixtures: a PPO run on the tiny model with one checkpoint, and one keeping two.
from test_evaluation import tiny_ppo_run, tiny_ppo_run_two_checkpoints  # noqa: F401
from test_label_screen import ENGINE_TIMEOUT_S, wait_until


def test_checkpoint_options_list_every_kept_checkpoint_newest_first():
    kept = {"ppo-1": [3, 4, 5], "ppo-2": [], "ppo-3": [2]}  # each PPO run's kept steps, oldest run first
    assert checkpoint_options(kept) == [("ppo-3 @ step 2", ("ppo-3", 2)), ("ppo-1 @ step 5", ("ppo-1", 5)),
                                        ("ppo-1 @ step 4", ("ppo-1", 4)), ("ppo-1 @ step 3", ("ppo-1", 3))]
    assert opponent_options(kept) == [REFERENCE_OPTION, ("ppo-3 @ step 2 (its latest checkpoint)", "ppo-3"),
                                      ("ppo-1 @ step 5 (its latest checkpoint)", "ppo-1")]


def test_session_options_offer_unfinished_sessions_newest_first_then_a_new_one():
    sessions = [{"id": "eval-1", "candidate": "ppo-1@5", "opponent": "reference", "decided": 2, "pairs": 4},
                {"id": "eval-2", "candidate": "ppo-1@5", "opponent": "reference", "decided": 3, "pairs": 3},
                {"id": "eval-3", "candidate": "ppo-2@9", "opponent": "ppo-1@5", "decided": 0, "pairs": 5}]
    assert session_options(sessions) == [("eval-3: ppo-2@9 vs ppo-1@5, 0 of 5 labeled", "eval-3"),
                                         ("eval-1: ppo-1@5 vs reference, 2 of 4 labeled", "eval-1"),
                                         ("a new session (the settings below)", "new")]


def test_reveal_lines_name_each_side():
    pairs = [{"choice": "a", "candidate_side": "b"}, {"choice": None, "candidate_side": "a"},
             {"choice": "tie", "candidate_side": "a"}, {"choice": "skip", "candidate_side": "a"}]
    assert reveal_lines(pairs, "ppo-1@5", "reference") == [
        "  1. A better  A = reference, B = ppo-1@5: loss",
        "  3. tie       A = ppo-1@5, B = reference: tie",
        "  4. skipped   A = ppo-1@5, B = reference: not counted"]


def configure(workspace: Workspace) -> None:
    with workspace.config_path.open("a") as f:
        f.write("[sampling]\nmax_new_tokens = 6\n")


async def decide(pilot, screen: EvalScreen, key: str) -> None:
    """Press `key` once the pair on screen has been visible long enough for a decision to count."""
    await wait_until(pilot, lambda: screen.shown_at is not None, 10, "the pair painted")
    while (event_clock() - screen.shown_at) * 1000 < MIN_LOOK_MS + 50:
        await pilot.pause(0.05)
    await pilot.press(key)


def eval_comparisons(workspace: Workspace) -> list[dict]:
    with Store(workspace.db_path) as store:
        return [row for row in store.comparisons() if row["eval_pair_id"] is not None]


async def test_prepare_through_the_engine_label_blind_and_reveal(workspace, store, tiny_ppo_run):  # noqa: F811
    configure(workspace)
    app = RlhfApp(workspace, workspace.load_config(), annotator="ann")
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("ctrl+e")
        screen = app.screen
        assert isinstance(screen, EvalScreen) and screen.stage == "setup"
        assert screen.query_one("#eval-checkpoint").value == (tiny_ppo_run, 1)
        tag = screen.query_one("#eval-tag")
        screen.set_focus(tag)
        await pilot.press("a", "t", "e")  # decision keys are off in the form: they type
        assert tag.value == "ate"
        await pilot.press("enter")  # no prompt has that tag: the engine says so
        await wait_until(pilot, lambda: screen.stage == "setup" and "no prompts tagged 'ate'" in screen.message,
                         ENGINE_TIMEOUT_S, "the engine's refusal")
        tag.value = ""
        screen.query_one("#eval-count").value = "3"
        screen.set_focus(None)
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.stage == "labeling", ENGINE_TIMEOUT_S, "the blind pairs")
        session = screen.session
        assert len(screen.pairs) == 3 and session["candidate"] == f"{tiny_ppo_run}@1"
        assert not screen.query_one("#eval-setup").display  # the form naming the checkpoint is gone
        shown = " ".join(str(widget.render()) for widget in screen.query("#eval-status, #eval-prompt Static, "
                                                                         "#eval-answers Static"))
        assert "pair 1 of 3" in shown and tiny_ppo_run not in shown and "reference" not in shown  # systems hidden

        await wait_until(pilot, lambda: screen.shown_at is not None, 10, "the pair painted")
        painted = screen.shown_at
        screen.shown_at = event_clock() + 60  # as if the key came before the pair was painted: it does not count
        await pilot.press("a")
        assert eval_comparisons(workspace) == []
        screen.shown_at = painted
        await decide(pilot, screen, "a")
        assert [(row["choice"], row["source"]) for row in eval_comparisons(workspace)] == [("a", "eval")]
        await pilot.press("u")  # undo: the pair is back, its decision deleted
        assert eval_comparisons(workspace) == [] and screen.position == 0
        await decide(pilot, screen, "left")
        await decide(pilot, screen, "t")
        assert [row["choice"] for row in eval_comparisons(workspace)] == ["a", "tie"]
        assert screen.position == 2
        await pilot.press("e")  # end early: reveal with what is decided
        assert screen.stage == "revealed"
        text = screen.reveal_text()
        assert "identities revealed" in text and f"{tiny_ppo_run}@1 vs reference: win rate" in text
        assert "on 2 of 3 pairs" in text and text.count("A = ") == 2
        await pilot.press("n")
        assert screen.stage == "setup"


async def test_the_last_decision_reveals_and_skips_do_not_count(workspace, store, tiny_ppo_run):  # noqa: F811
    from rlhf.models import load_causal_lm, load_tokenizer

    configure(workspace)
    cfg = workspace.load_config()
    plan = plan_eval(store, workspace, count=2, seed=1)
    session_id = prepare_eval(store, plan, load_causal_lm(plan.model_name), load_tokenizer(plan.model_name), cfg)
    app = RlhfApp(workspace, cfg, annotator="ann")
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("ctrl+e")
        screen = app.screen
        assert screen.query_one("#eval-session").value == session_id  # made headless: offered first
        await pilot.press("enter")
        assert screen.stage == "labeling" and screen.session["id"] == session_id
        first = screen.pairs[0]["candidate_side"]
        await decide(pilot, screen, "1" if first == "a" else "2")  # the candidate's side: a win
        await decide(pilot, screen, "space")  # skip
        assert screen.stage == "revealed"
        assert "win rate 1.00" in screen.reveal_text() and "1 skipped on 2 of 2 pairs" in screen.reveal_text()
        await pilot.press("n")  # the finished session is no longer offered; its result is listed
        assert screen.query_one("#eval-session").value == "new"
        assert "win rate 1.00" in str(screen.query_one("#eval-results").render())


async def test_eval_is_a_screen_in_the_palette_and_the_tab_cycle(workspace, store):
    app = RlhfApp(workspace, workspace.load_config(), annotator="ann")
    async with app.run_test(size=(140, 40)) as pilot:
        assert "Eval" in [command.title for command in app.get_system_commands(app.screen)]
        for _ in range([tab.name for tab in TABS].index("eval")):
            await pilot.press("tab")
        assert isinstance(app.screen, EvalScreen)
        assert app.screen.query_one("#eval-checkpoint").is_blank()
        await pilot.press("enter")  # nothing to evaluate: said, nothing sent
        assert app.screen.stage == "setup"


async def test_every_kept_checkpoint_is_offered_and_an_older_one_is_evaluated(
        workspace, store, tiny_ppo_run_two_checkpoints):  # noqa: F811
    run_id = tiny_ppo_run_two_checkpoints
    configure(workspace)
    app = RlhfApp(workspace, workspace.load_config(), annotator="ann")
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("ctrl+e")
        screen = app.screen
        checkpoint = screen.query_one("#eval-checkpoint")
        assert checkpoint.value == (run_id, 2)  # the newest first
        screen.set_focus(checkpoint)
        await pilot.press("enter")  # open the list
        listed = checkpoint.query_one(OptionList)
        shown = [str(listed.get_option_at_index(i).prompt) for i in range(listed.option_count)]
        assert shown[1:] == [f"{run_id} @ step 2", f"{run_id} @ step 1"]  # after the blank entry
        await pilot.press("down", "enter")  # the older checkpoint
        assert checkpoint.value == (run_id, 1)
        screen.query_one("#eval-count").value = "2"
        screen.set_focus(None)
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.stage == "labeling", ENGINE_TIMEOUT_S, "the blind pairs")
        assert screen.session["candidate"] == f"{run_id}@1" and screen.session["checkpoint_step"] == 1
