"""The Train screen against a real engine process and the tiny model, on an 80x24 terminal: launch PPO,
see every pane receive data, stop it with the key, resume it from the Runs list, stop it hard; the
command palette's actions; and the engine killed mid-run.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from textual.app import App, ComposeResult

from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens.runs import RunsScreen
from rlhf_tui.app.screens.train import PPO_FORM_KEYS, TrainScreen
from rlhf_tui.app.widgets.charts import REDRAW_INTERVAL_S, MetricChart
from rlhf_tui.app.widgets.run_feed import RunUpdate
from rlhf_tui.app.widgets.run_view import VALUE_CHART, RunView, SamplesPane, has_value_head, kl_target
from rlhf.config import Workspace
from rlhf.store import Store
from test_reward_screen import (ENGINE_TIMEOUT_S, db_metric, db_run, make_workspace, plain, type_into,
                                wait_until)

# Tiny PPO: 4 prompts per step, 8 new tokens, one PPO epoch, a checkpoint every 2 steps.
PPO_TOML = ("[ppo]\nsteps = 300\nbatch_size = 4\nminibatches = 2\nppo_epochs = 1\nmax_new_tokens = 8\n"
            "checkpoint_every = 2\n")
PALETTE_NAMES = {"Label", "Reward model", "Train", "Runs", "Start PPO", "Stop run"}
READABLE = (36, 8)  # columns and rows inside a pane's border on 80x24: axes, ticks and a curve fit


@pytest.fixture(scope="module")
def rewarded(tmp_path_factory, tiny_model_dir) -> tuple[Workspace, str]:
    """A workspace with a finished one-epoch reward run (trained in this process, before any app starts)."""
    from rlhf.reward import train_reward

    ws = make_workspace(tmp_path_factory.mktemp("train") / "ws", tiny_model_dir, PPO_TOML)
    result = train_reward(ws, ws.load_config().override({"reward.epochs": 1}))
    assert result.status == "finished", result.message
    return ws, result.run_id


def checkpoint_intact(row: dict) -> bool:
    """The run's recorded checkpoint is on disk, complete, and at the step the row says."""
    path = Path(row.checkpoint)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return (state["step"] == row.checkpoint_step and (path / "policy" / "adapter_config.json").is_file()
            and (path / "value_head.safetensors").is_file())


def palette(app: RlhfApp) -> dict:
    return {command.title: command for command in app.get_system_commands(app.screen)}


class ChartApp(App):
    def compose(self) -> ComposeResult:
        yield MetricChart("KL", ("kl_k1",), right=("kl_coef",), labels={"kl_k1": "k1", "kl_coef": "β"}, target=6.0)


class RunViewApp(App):
    def compose(self) -> ComposeResult:
        yield RunView("ppo")


@pytest.mark.parametrize("algorithm, shown", [("ppo", True), ("rloo", False), ("grpo", False), (None, True)])
async def test_value_head_pane_only_for_runs_that_train_one(algorithm, shown):
    config = {"ppo": {"algorithm": algorithm} if algorithm else {}}  # None: a run stored before ppo.algorithm
    assert has_value_head(config) is shown
    app = RunViewApp()
    async with app.run_test(size=(100, 30)):
        view = app.query_one(RunView)
        view.apply(RunUpdate(status="running", step=0, total_steps=5, config=config))
        assert view.chart(VALUE_CHART).display is shown
        view.toggle_secondary()
        assert view.chart("chart-losses").display  # the policy's panes stay


async def test_metric_chart_fills_a_buffer_and_redraws_on_its_timer():
    app = ChartApp()
    async with app.run_test(size=(60, 16)) as pilot:
        chart = app.query_one(MetricChart)
        await pilot.pause(REDRAW_INTERVAL_S * 2)
        before = chart.redraws
        for step in range(1, 501):  # a burst of steps, faster than any redraw
            chart.add_steps({step: {"kl_k1": step / 100, "kl_coef": 0.05, "not_charted": 1.0}})
        chart.add_steps({501: {"kl_k1": float("nan")}})  # a non-finite value is not a point
        assert chart.redraws == before  # adding only fills the buffer
        await pilot.pause(REDRAW_INTERVAL_S * 3)
        assert chart.redraws == before + 1  # one redraw for the whole burst, none while nothing changes
        assert len(chart.points["kl_k1"]) == 500 and set(chart.points) == {"kl_k1", "kl_coef"}
        assert plain(chart.border_title) == "KL · k1 5 · β 0.05 · target 6"
        chart.clear()
        await pilot.pause(REDRAW_INTERVAL_S * 2)
        assert plain(chart.border_title) == "KL · k1 – · β – · target 6"


def test_kl_target_only_when_a_controller_steers_to_it():
    assert kl_target({"ppo": {"kl_controller": "log", "target_kl": 3.0}}) == 3.0
    assert kl_target({"ppo": {"kl_controller": "classic", "target_kl": 3.0}}) == 3.0
    assert kl_target({"ppo": {"kl_controller": "fixed", "target_kl": 3.0}}) is None
    # Runs stored before ppo.kl_controller replaced ppo.adaptive_kl
    assert kl_target({"ppo": {"adaptive_kl": True, "target_kl": 3.0}}) == 3.0
    assert kl_target({"ppo": {"adaptive_kl": False, "target_kl": 3.0}}) is None


async def test_launch_watch_stop_resume_and_hard_stop(rewarded):
    ws, reward_run = rewarded
    app = RlhfApp(ws, ws.load_config(), annotator="t")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("tab", "tab")
        screen = app.screen
        assert isinstance(screen, TrainScreen)
        assert screen.reward_select.value == reward_run  # the latest finished reward run by default
        assert screen.form.values()["ppo.steps"] == 300  # the form starts from the config
        await type_into(pilot, "#setting-ppo-lr", "-1")
        assert screen.form.errors == {"ppo.lr": "ppo.lr must be > 0.0, got -1.0"}
        await type_into(pilot, "#setting-ppo-lr", "0.001")
        await pilot.click("#start")
        assert screen.pending and screen.showing_panes

        view = screen.view
        reward, kl, entropy = (view.chart(c) for c in ("chart-reward", "chart-kl", "chart-entropy"))
        await wait_until(pilot, lambda: view.feed.checkpoint_step and len(reward.points["score_mean"]) >= 3,
                         ENGINE_TIMEOUT_S, "three steps and a checkpoint")
        run_id = screen.run_id
        assert reward.points["rlhf_reward"] and kl.points["kl_k1"] and kl.points["kl_k3"] and kl.points["kl_coef"]
        assert entropy.points["entropy"] and kl.target == 6.0  # adaptive KL: its target is drawn
        samples = view.query_one(SamplesPane)
        await wait_until(pilot, lambda: samples.text.startswith("step "), what="samples in the pane")
        assert "score" in samples.text and "KL" in samples.text
        await wait_until(pilot, lambda: "tok/s" in view.status_text(), what="the status bar")
        status = view.status_text()
        assert status.startswith("running · step ") and "/300" in status and "ETA" in status
        assert screen.sub_title == run_id  # the run id is in the header
        assert all(phase in status for phase in ("rollout", "score", "train", "checkpoint at "))
        await wait_until(pilot, lambda: re.search(r"score -?\d", plain(reward.border_title)), what="a redraw")
        for pane in (reward, kl, entropy, samples):  # readable on 80x24
            assert pane.content_region.width >= READABLE[0] and pane.content_region.height >= READABLE[1], pane
        # For that, the reward model's agreement figures give way on 80x24; its alarm would not.
        agreement = screen.query_one("#agreement")
        assert screen.has_class("-short") and not agreement.display
        for falling in (True, False):  # applied here and now: the pane's own 2 s refresh cannot interleave
            agreement.set_class(falling, "falling")
            app.stylesheet.apply(agreement)
            assert agreement.display == falling

        # Secondary metrics are one key away.
        await pilot.press("m")
        losses = view.chart("chart-losses")
        assert view.showing_secondary and not view.query_one("#primary").display
        await wait_until(pilot, lambda: losses.points["policy_loss"] and view.chart("chart-eos").points["eos_rate"],
                         what="secondary metrics")
        await pilot.press("m")
        assert not view.showing_secondary

        # Stop with the key: the step finishes, a checkpoint is written, the run says stopped.
        await pilot.press("s")
        # The step may have ended (and the stop with it) before the key press returns.
        assert "stopping…" in view.status_text() or view.feed.status == "stopped"
        await wait_until(pilot, lambda: view.feed.final, what="the graceful stop")
        row = db_run(ws, run_id)
        assert row.status == view.feed.status == "stopped"
        assert row.checkpoint_step == row.step == view.feed.step and checkpoint_intact(row)
        assert sorted(db_metric(ws, run_id, "score_mean")) == list(range(1, row.step + 1))
        assert reward.points["score_mean"] == db_metric(ws, run_id, "score_mean")
        stopped_at = row.step

        # Resume it from the Runs list: the Train screen shows the old steps and continues.
        await pilot.press("tab")
        runs = app.screen
        assert isinstance(runs, RunsScreen) and runs.selected_run_id() == run_id  # newest first
        await pilot.press("r")
        await wait_until(pilot, lambda: screen.run_id == run_id and view.feed.step > stopped_at, ENGINE_TIMEOUT_S,
                         "a step after the resume")
        assert app.screen is screen and view.feed.status == "running"
        assert min(reward.points["score_mean"]) == 1  # the steps before the stop are still drawn

        # Labeling meanwhile: the one engine is training, and samples the Label screen's pairs between its steps.
        await app.switch_mode("label")
        label_status = app.screen.query_one("#status")
        await wait_until(pilot, lambda: "engine training: pairs between its steps" in str(label_status.content),
                         what="the label status line")
        await app.switch_mode("train")

        # Stop hard: "Stop run" from the palette asks gracefully, the Stop key's action again ends it at once
        # (called directly: a key press could come after the graceful stop had already ended the step).
        old_engine = app.engine.pid
        await palette(app)["Stop run"].callback()
        assert screen.stop_state == "graceful" and "stopping… after this step" in view.status_text()
        screen.action_stop()
        assert screen.stop_state == "hard" and "stopping… at once" in view.status_text()
        await wait_until(pilot, lambda: view.feed.final, what="the hard stop")
        row = db_run(ws, run_id)
        assert row.status == "stopped" and "hard stop" in row.error and "hard stop" in view.status_text()
        assert checkpoint_intact(row)
        await wait_until(pilot, lambda: app.engine.alive and app.engine.pid != old_engine, what="a fresh engine")


async def test_engine_killed_mid_run_marks_the_run_interrupted(rewarded):
    ws, _ = rewarded
    app = RlhfApp(ws, ws.load_config(), annotator="t")
    async with app.run_test(size=(80, 24)) as pilot:
        commands = palette(app)
        assert PALETTE_NAMES <= set(commands)
        await commands["Stop run"].callback()  # nothing to stop: says so, changes nothing
        assert app.current_mode == "label"

        # A setting only the engine can check (divisibility) comes back next to the form.
        await commands["Train"].callback()
        screen = app.screen
        assert isinstance(screen, TrainScreen) and set(screen.form.keys) == set(PPO_FORM_KEYS)
        await type_into(pilot, "#setting-ppo-minibatches", "3")
        await pilot.click("#start")
        await wait_until(pilot, lambda: not screen.pending, ENGINE_TIMEOUT_S, "the engine's answer")
        assert "ppo.batch_size (4) must be divisible" in str(screen.query_one("#form-error").content)
        assert not screen.showing_panes and screen.run_id is None
        await type_into(pilot, "#setting-ppo-minibatches", "2")

        # "Start PPO" launches with the form as it is; kill the engine once a checkpoint is on disk.
        await commands["Start PPO"].callback()
        view = screen.view
        await wait_until(pilot, lambda: (view.feed.checkpoint_step or 0) >= 2, ENGINE_TIMEOUT_S, "a checkpoint")
        run_id = screen.run_id
        os.kill(app.engine.pid, signal.SIGKILL)
        await wait_until(pilot, lambda: view.feed.final, what="the run marked lost")
        row = db_run(ws, run_id)
        assert row.status == view.feed.status == "interrupted"
        assert "SIGKILL" in view.status_text() and "resume it from Runs" in view.status_text()
        assert checkpoint_intact(row) and row.checkpoint_step >= 2
        with Store(ws.db_path) as store:
            assert max(store.metrics_by_step(run_id)) >= row.checkpoint_step
        assert screen.check_action("stop", ()) is False
