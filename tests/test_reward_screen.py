"""The Reward model screen against a real engine process and the tiny model: the settings form's checks,
training started from the screen with live charts, the Stop key, and a finished run handed to PPO.

Also the helpers the Train and Runs screen tests share: a workspace of hidden-rule preference pairs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from textual.app import App, ComposeResult
from textual.content import Content
from textual.widgets import Select

from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens.base import RlhfScreen
from rlhf_tui.app.screens.reward import RewardScreen
from rlhf_tui.app.screens.train import TrainScreen
from rlhf_tui.app.widgets.settings_form import SettingsForm, check_setting, parse_setting
from rlhf.config import Config, Workspace
from rlhf.errors import ConfigError
from rlhf.store import Store
from tools.tiny import hidden_rule_pairs, workspace_with_pairs

ENGINE_TIMEOUT_S = 180  # a cold engine imports torch first: slow on the shared 2-core machine
STEP_TIMEOUT_S = 90


def make_workspace(root: Path, model_dir: Path, toml: str = "") -> Workspace:
    """A workspace on the tiny model holding 80 hidden-rule preference pairs over 20 prompts.

    The label screen opens first and asks the engine for one pair (prefetch 0): little work beside training.
    """
    return workspace_with_pairs(root, model_dir, hidden_rule_pairs(20, 4),
                                "[sampling]\nprefetch = 0\nmax_new_tokens = 4\n[reward]\nheldout_fraction = 0.2\n"
                                + toml)


async def wait_until(pilot, predicate, timeout_s: float = STEP_TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def db_run(ws: Workspace, run_id: str) -> dict:
    with Store(ws.db_path) as store:
        return store.run(run_id)


def db_metric(ws: Workspace, run_id: str, name: str) -> dict[int, float]:
    with Store(ws.db_path) as store:
        return {row["step"]: row["value"] for row in store.metrics(run_id, name)}


def plain(markup: str) -> str:
    """A border title as the person reads it."""
    return Content.from_markup(markup).plain


async def type_into(pilot, selector: str, text: str) -> None:
    """Focus a field, clear it (end, then delete everything left of the cursor) and type `text`."""
    pilot.app.screen.query_one(selector).focus()
    await pilot.press("end", "ctrl+u", *text)


# -- the form's checks are the config's ----------------------------------------------------------


def test_parse_setting_uses_the_fields_type():
    assert parse_setting("reward.epochs", " 5 ") == 5
    assert parse_setting("reward.lr", "1e-4") == 1e-4
    assert parse_setting("ppo.prompt_tag", " tag ") == "tag"
    with pytest.raises(ConfigError, match=r"^reward.epochs must be int, got '2.5'$"):
        parse_setting("reward.epochs", "2.5")
    with pytest.raises(ConfigError, match=r"^ppo.lr must be float, got 'fast'$"):
        parse_setting("ppo.lr", "fast")


def test_check_setting_reports_the_configs_message_naming_the_key():
    cfg = Config()
    assert check_setting(cfg, "reward.lr", 0.0) == "reward.lr must be > 0.0, got 0.0"
    assert check_setting(cfg, "ppo.steps", 0) == "ppo.steps must be >= 1, got 0"
    assert check_setting(cfg, "reward.quantization", "2bit") == ("reward.quantization must be one of model, none, "
                                                                 "4bit, 8bit, got '2bit'")
    assert check_setting(cfg, "ppo.lr", float("nan")) == "ppo.lr must be a finite number, got nan"
    assert check_setting(cfg, "reward.epochs", 2) is None
    assert cfg.reward.epochs == 3  # checking never changes the config it checks against


class FormApp(App):
    KEYS = ("reward.epochs", "reward.quantization", "ppo.gradient_checkpointing", "reward.lr")

    def __init__(self) -> None:
        super().__init__()
        self.submitted = 0

    def compose(self) -> ComposeResult:
        yield SettingsForm(Config(), self.KEYS)

    def on_settings_form_submitted(self, event: SettingsForm.Submitted) -> None:
        self.submitted += 1


async def test_form_keys_walk_the_fields_past_a_select_and_enter_submits():
    app = FormApp()
    async with app.run_test() as pilot:
        app.query_one("#setting-reward-epochs").focus()
        order = []
        for _ in FormApp.KEYS:
            order.append(app.focused.id)
            await pilot.press("down")
        assert order == ["setting-reward-epochs", "setting-reward-quantization", "setting-ppo-gradient_checkpointing",
                         "setting-reward-lr"]
        await pilot.press("up", "up", "up")
        select = app.query_one("#setting-reward-quantization", Select)
        assert app.focused is select
        await pilot.press("enter")  # opens the list, which keeps the arrows
        assert select.expanded
        await pilot.press("down", "down", "enter")  # past "model" (as [model] quantization) and "none"
        assert select.value == "4bit" and not select.expanded
        await pilot.press("down", "space")  # the checkbox
        form = app.query_one(SettingsForm)
        assert form.values() == {"reward.epochs": 3, "reward.quantization": "4bit", "ppo.gradient_checkpointing": True,
                                 "reward.lr": 0.001}
        # What a run launched from the form uses: the form's config with the fields' values on top.
        expected = Config()
        expected.reward.quantization, expected.ppo.gradient_checkpointing = "4bit", True
        assert form.chosen_config().to_dict() == expected.to_dict()
        await pilot.press("down", "enter")
        assert app.submitted == 1


# -- the screen with a real engine ---------------------------------------------------------------


async def test_train_from_the_screen_watch_the_charts_stop_and_hand_to_ppo(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir)
    # The app's config (here with a setting rlhf.toml does not have) is what its runs start from.
    app = RlhfApp(ws, ws.load_config().override({"reward.center_coef": 0.02}), annotator="t")
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("tab")
        screen = app.screen
        assert isinstance(screen, RewardScreen) and app.current_mode == "reward"
        assert isinstance(screen, RlhfScreen) and screen.app is app  # the typed `app` is the running one
        assert screen.view.feed.run_id is None  # no reward run in this workspace yet

        # A value the config refuses shows its message under the field and blocks the start.
        await type_into(pilot, "#setting-reward-lr", "0")
        assert screen.form.errors == {"reward.lr": "reward.lr must be > 0.0, got 0.0"}
        assert screen.form.chosen_config() is None
        assert "reward.lr must be > 0.0" in str(screen.query_one("#setting-reward-lr").parent
                                                .query_one(".setting-error").content)
        await pilot.click("#start")
        assert not screen.pending and "fix the settings" in str(screen.query_one("#form-error").content)
        with Store(ws.db_path) as store:
            assert store.runs() == []

        # Many epochs, so that the run is still going when it is stopped.
        await type_into(pilot, "#setting-reward-lr", "0.001")
        await type_into(pilot, "#setting-reward-epochs", "200")
        await type_into(pilot, "#setting-reward-batch_size", "4")
        assert screen.form.errors == {}
        await pilot.press("enter")  # from the keyboard: enter in a field starts, then s must reach the screen
        assert screen.pending and screen.check_action("stop", ()) is True  # stoppable while starting
        loss = screen.view.chart("chart-loss")
        await wait_until(pilot, lambda: len(loss.points["loss"]) >= 3, ENGINE_TIMEOUT_S, "three training steps")
        run_id = screen.run_id
        assert run_id is not None and screen.view.feed.total_steps == db_run(ws, run_id).total_steps > 200
        # The run trains with the form's settings on top of the app's config (not a re-read rlhf.toml).
        started_with = db_run(ws, run_id).config["reward"]
        assert (started_with["epochs"], started_with["batch_size"], started_with["center_coef"]) == (200, 4, 0.02)
        accuracy = screen.view.chart("chart-accuracy")
        assert 0 in accuracy.points["heldout_acc"]  # the untrained model's held-out accuracy, at step 0
        await wait_until(pilot, lambda: re.search(r"train -?\d", plain(loss.border_title)), what="a redraw")

        assert app.focused is None  # out of the form once the run started: s is not typed into a field
        await pilot.press("s")
        # The step may have ended (and the stop with it) before the key press returns.
        assert "stopping…" in screen.view.status_text() or screen.view.feed.status == "stopped"
        await wait_until(pilot, lambda: screen.view.feed.final, what="the stopped run")
        assert screen.view.feed.status == "stopped"
        row = db_run(ws, run_id)
        assert row.status == "stopped" and Path(row.checkpoint, "adapter").is_dir()
        # The chart holds exactly what the database holds.
        assert loss.points["loss"] == db_metric(ws, run_id, "loss")
        assert screen.check_action("stop", ()) is False  # nothing left to stop: the key is hidden
        assert screen.check_action("use_for_ppo", ()) is False  # a stopped run does not score PPO

        # A short run that finishes is offered to PPO: `p` opens the Train screen with it chosen.
        await type_into(pilot, "#setting-reward-epochs", "1")
        await pilot.click("#start")
        await wait_until(pilot, lambda: screen.run_id not in (None, run_id) and screen.view.feed.final,
                         ENGINE_TIMEOUT_S, "a finished one-epoch run")
        finished = screen.run_id
        assert screen.view.feed.status == "finished" and db_run(ws, finished).status == "finished"
        assert "held-out accuracy" in screen.view.status_text()
        await pilot.press("p")
        assert app.current_mode == "train"
        train = app.screen
        assert isinstance(train, TrainScreen) and train.reward_select.value == finished
