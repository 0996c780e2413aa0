"""The Runs screen and the one data path behind every run's panes: updates from engine events and from
the database, merged into a RunFeed; the derived figures (ETA, elapsed, status rows); and, against the
real app, a PPO run started headless (`rlhf-tui ppo` in another process) followed live from the list.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from textual.widgets import DataTable

from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens.runs import RunScreen, RunsScreen, final_metrics_text, resume_refusal
from rlhf_tui.app.widgets.run_feed import (SAMPLES_KEPT, DbFollower, RunFeed, RunUpdate, detail_line, elapsed_seconds,
                                  eta_seconds, format_duration, samples_text, seconds_per_step, status_line,
                                  update_from_event)
from rlhf_tui.app.widgets.run_view import SamplesPane
from rlhf.engine import protocol
from rlhf.hooks import RunResult
from rlhf.run_rows import RunTiming
from rlhf.store import PromptItem
from rlhf_tui.app.screens.reward import RewardScreen
from test_reward_screen import ENGINE_TIMEOUT_S, db_metric, db_run, make_workspace, wait_until
from test_train_screen import rewarded  # noqa: F401 - the fixture: a workspace with a finished reward run

ROOT = Path(__file__).resolve().parents[1]

# -- derived figures -----------------------------------------------------------------------------


def test_seconds_per_step_and_eta():
    assert seconds_per_step([]) is None
    assert seconds_per_step([(3, 10.0)]) is None  # one arrival: no speed yet
    assert seconds_per_step([(3, 10.0), (5, 14.0), (7, 22.0)]) == 3.0  # (22 - 10) s / (7 - 3) steps
    assert eta_seconds(3.0, step=7, total_steps=10) == 9.0
    assert eta_seconds(3.0, step=12, total_steps=10) == 0.0
    assert eta_seconds(None, step=7, total_steps=10) is None
    assert eta_seconds(3.0, step=7, total_steps=None) is None


def test_elapsed_and_durations():
    start = "2026-01-01T10:00:00.000+00:00"
    now = datetime(2026, 1, 1, 10, 2, 5, tzinfo=timezone.utc)
    assert elapsed_seconds(RunTiming(start), now) == 125.0
    assert elapsed_seconds(RunTiming(start, "2026-01-01T10:00:30.500+00:00"), now) == 30.5  # ended: the clock stopped
    # Resumed at 10:02:00 after 30 s of running: 30 s + the 5 s since, not the 2 minutes it stood still.
    assert elapsed_seconds(RunTiming(start, None, "2026-01-01T10:02:00.000+00:00", 30.0), now) == 35.0
    assert elapsed_seconds(None, now) is None
    assert [format_duration(s) for s in (None, 0, 59.4, 125, 3725)] == ["–", "0:00", "0:59", "2:05", "1:02:05"]


# -- one data path: events and database rows become RunUpdates ------------------------------------


def test_update_from_event():
    assert update_from_event(protocol.RunStarted("r", "ppo", 10, start_step=4)) == RunUpdate(
        status="running", step=4, total_steps=10)
    assert update_from_event(protocol.RunStep("r", 5, {"kl_k1": 0.1})) == RunUpdate(steps={5: {"kl_k1": 0.1}}, step=5)
    samples = update_from_event(protocol.RunSamples("r", 5, [{"prompt": "p", "response": "a", "score": 1.0}]))
    assert samples.samples == {5: [{"prompt": "p", "response": "a", "score": 1.0, "step": 5}]}
    assert update_from_event(protocol.RunCheckpoint("r", 6, "/x")) == RunUpdate(checkpoint_step=6)
    assert update_from_event(protocol.RunEnded(RunResult("r", "stopped", "stopped at 6"))) == RunUpdate(
        status="stopped", message="stopped at 6")
    assert update_from_event(protocol.Ready("m", None, {})) is None


def test_feed_merges_updates_idempotently_and_times_new_steps():
    feed = RunFeed("r", "ppo")
    feed.apply(RunUpdate(status="running", step=0, total_steps=10), now=100.0)
    feed.apply(RunUpdate(steps={1: {"kl_k1": 0.5}}, step=1), now=103.0)
    feed.apply(RunUpdate(steps={1: {"kl_k1": 0.5, "entropy": 2.0}}), now=104.0)  # the same step again, more names
    feed.apply(RunUpdate(steps={2: {"kl_k1": 0.7}}, step=2), now=109.0)
    assert feed.metrics == {1: {"kl_k1": 0.5, "entropy": 2.0}, 2: {"kl_k1": 0.7}}
    assert feed.arrivals == [(0, 100.0), (1, 103.0), (2, 109.0)]  # a repeated step is not a new arrival
    assert seconds_per_step(feed.arrivals) == 4.5 and feed.latest("entropy") == 2.0
    feed.apply(RunUpdate(step=1), now=110.0)  # a stale row (the DB lags the events) does not move it back
    assert feed.step == 2

    feed.apply(RunUpdate(samples={1: [{"step": 1, "prompt": "a", "response": "x"}],
                                  2: [{"step": 2, "prompt": "b", "response": "y"}]}))
    feed.apply(RunUpdate(samples={2: [{"step": 2, "prompt": "b", "response": "y"}]}))  # already held
    assert [s["prompt"] for s in feed.samples] == ["b", "a"]  # newest first, once each
    feed.apply(RunUpdate(samples={s: [{"step": s, "prompt": "c", "response": "z"}] for s in range(3, 60)}))
    assert len(feed.samples) == SAMPLES_KEPT and feed.samples[0]["step"] == 59

    feed.apply(RunUpdate(status="running", step=1, steps={1: {"kl_k1": 0.9}}, reset=True), now=120.0)
    assert feed.metrics == {1: {"kl_k1": 0.9}} and feed.samples == [] and feed.arrivals == [(1, 120.0)]


def test_status_rows():
    feed = RunFeed("ppo-1", "ppo")
    assert status_line(RunFeed(), notice="starting PPO…") == "starting PPO…"
    feed.apply(RunUpdate(status="running", step=0, total_steps=10, timing=RunTiming("2026-01-01T10:00:00+00:00"),
                         config={"ppo": {"target_kl": 6.0, "adaptive_kl": True}}), now=0.0)
    feed.apply(RunUpdate(steps={2: {"tokens_per_s": 512.4, "time_rollout": 1.234, "time_score": 0.5,
                                    "time_train": 2.0}}, step=2, checkpoint_step=2), now=8.0)
    now = datetime(2026, 1, 1, 10, 0, 9, tzinfo=timezone.utc)
    assert status_line(feed, now) == "running · step 2/10 · elapsed 0:09 · ETA 0:32 · checkpoint at 2"
    assert status_line(feed, now, notice="stopping…").startswith("stopping… · step 2/10")
    feed.add_warning("step 2: KL is negative")
    assert detail_line(feed) == "⚠ step 2: KL is negative · 512 tok/s · rollout 1.23s score 0.50s train 2.00s"
    feed.apply(RunUpdate(status="stopped", message="stopped at step 2/10",
                         timing=RunTiming("2026-01-01T10:00:00+00:00", "2026-01-01T10:00:05+00:00")))
    assert status_line(feed, now + timedelta(hours=1)) == "stopped · step 2/10 · elapsed 0:05 · checkpoint at 2"
    assert detail_line(feed).startswith("stopped at step 2/10 · ⚠ step 2")

    reward = RunFeed("reward-1", "reward")
    reward.apply(RunUpdate(status="running", step=3, total_steps=30, config={"reward": {"epochs": 3}},
                           steps={3: {"epoch": 0.3, "loss": 0.6}, 0: {"heldout_acc": 0.5}}))
    assert detail_line(reward) == "epoch 0.30/3 · held-out acc 0.5"


def test_samples_text_is_plain_and_newest_first():
    text = samples_text([{"step": 3, "prompt": "q\x1b[2J", "response": " a\x07 ", "score": 0.51234, "kl": None},
                         {"step": 2, "prompt": "old", "response": "b", "score": -1.0, "kl": 0.25}])
    assert text == ("step 3 · score 0.512 · KL –\n> q\u241b[2J\na\u2407\n\n"
                    "step 2 · score -1 · KL 0.25\n> old\nb")


def test_db_follower_reads_only_what_is_new(workspace, store):
    [prompt_id], _ = store.add_prompts([PromptItem("p")], "test")
    run_id = store.create_run("ppo", {"ppo": {"target_kl": 6.0}}, total_steps=5)
    store.log_metrics(run_id, 1, {"score_mean": 0.1})
    store.log_metrics(run_id, 2, {"score_mean": 0.2})
    store.add_samples(run_id, 2, [{"prompt_id": prompt_id, "prompt": "p", "response": "r2", "score": 0.2}])
    store.update_run(run_id, step=2)
    follower = DbFollower(store, run_id)
    first = follower.poll()
    assert first.steps == {1: {"score_mean": 0.1}, 2: {"score_mean": 0.2}} and first.status == "running"
    assert [s["response"] for s in first.samples[2]] == ["r2"] and first.step == 2 and not first.reset
    # Nothing new: the last step is read again (a reward run adds held-out metrics to a step later).
    store.log_metrics(run_id, 2, {"heldout_acc": 0.75})
    again = follower.poll()
    assert again.steps == {2: {"score_mean": 0.2, "heldout_acc": 0.75}} and again.samples == {}
    store.log_metrics(run_id, 3, {"score_mean": 0.3})
    store.add_samples(run_id, 3, [{"prompt_id": prompt_id, "prompt": "p", "response": "r3", "score": 0.3}])
    store.update_run(run_id, step=3, checkpoint_step=2, status="stopped")
    third = follower.poll()
    assert set(third.steps) == {2, 3} and list(third.samples) == [3] and third.status == "stopped"
    assert third.checkpoint_step == 2 and third.timing.ended_at is not None
    # Resumed from its checkpoint: the steps after it are recomputed, so everything is read afresh.
    store.resume_run(run_id, 2)
    resumed = follower.poll()
    assert resumed.reset and set(resumed.steps) == {1, 2} and resumed.status == "running"
    assert final_metrics_text(store, store.run(run_id)) == "score 0.2"
    refusal = resume_refusal(store.run(run_id))
    assert refusal == f"{run_id} is running: only stopped, interrupted or failed runs resume"
    store.update_run(run_id, status="interrupted")
    assert resume_refusal(store.run(run_id)) is None
    reward_id = store.create_run("reward", {}, total_steps=1)
    store.update_run(reward_id, status="stopped")
    assert resume_refusal(store.run(reward_id)) is None


# -- the screen, following a run another process is training -----------------------------------------


def headless_ppo(ws_root: Path, steps: int) -> subprocess.Popen:
    """`rlhf-tui ppo` in its own process, as if typed in another terminal."""
    command = [sys.executable, "-m", "rlhf.cli", "--workspace", str(ws_root), "ppo", "--steps", str(steps)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_follow_a_headless_run_live_then_open_finished_runs(rewarded):  # noqa: F811
    ws, reward_run = rewarded
    app = RlhfApp(ws, ws.load_config(), annotator="t")
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("tab", "tab", "tab")
        runs = app.screen
        assert isinstance(runs, RunsScreen)
        table = runs.query_one(DataTable)
        assert table.get_row(reward_run)[1:4] == ["reward", "finished", f"{db_run(ws, reward_run).step}/"
                                                 f"{db_run(ws, reward_run).total_steps}"]
        assert table.get_row(reward_run)[4].startswith("held-out acc ")

        process = headless_ppo(ws.root, steps=300)
        try:
            await wait_until(pilot, lambda: table.row_count == 2, ENGINE_TIMEOUT_S, "the headless run in the list")
            table.move_cursor(row=0)  # newest first
            ppo_run = runs.selected_run_id()
            assert ppo_run.startswith("ppo-") and table.get_row(ppo_run)[2] == "running"
            await pilot.press("enter")
            screen = app.screen
            assert isinstance(screen, RunScreen) and screen.view.kind == "ppo"
            view = screen.view
            await wait_until(pilot, lambda: view.feed.step >= 1, ENGINE_TIMEOUT_S, "a first step")
            seen = view.feed.step
            await wait_until(pilot, lambda: view.feed.step >= seen + 2, what="two more steps, followed live")
            assert view.query_one(SamplesPane).text.startswith("step ")
            assert "ETA" in view.status_text() and view.feed.status == "running"

            process.send_signal(signal.SIGTERM)  # the CLI stops after the step, with a checkpoint
            assert process.wait(timeout=120) == 128 + signal.SIGTERM, process.stderr.read()
            await wait_until(pilot, lambda: view.feed.final, what="the stop, seen in the database")
            row = db_run(ws, ppo_run)
            assert view.feed.status == row.status == "stopped"
            assert view.feed.checkpoint_step == row.checkpoint_step == row.step
            assert view.chart("chart-reward").points["score_mean"] == db_metric(ws, ppo_run, "score_mean")
            assert view.chart("chart-kl").points["kl_coef"] == db_metric(ws, ppo_run, "kl_coef")
        finally:
            process.kill()

        await pilot.press("escape")
        assert app.screen is runs
        await wait_until(pilot, lambda: table.get_row(ppo_run)[2] == "stopped", what="the list to catch up")
        assert table.get_row(ppo_run)[4].startswith("score ")

        # A finished reward run opens as reward charts, read from the database; it cannot be resumed.
        table.move_cursor(row=table.get_row_index(reward_run))
        await pilot.press("o")
        screen = app.screen
        assert isinstance(screen, RunScreen) and screen.view.kind == "reward"
        assert screen.view.chart("chart-loss").points["loss"] == db_metric(ws, reward_run, "loss")
        assert screen.view.chart("chart-accuracy").points["heldout_acc"] == db_metric(ws, reward_run, "heldout_acc")
        assert screen.check_action("resume", ()) is False
        await pilot.press("escape")
        await pilot.press("r")  # the finished reward run is still selected: refused with a reason
        assert app.current_mode == "runs"


async def test_a_stopped_reward_run_resumes_from_the_list_on_the_reward_screen(tmp_path, tiny_model_dir):
    from rlhf.hooks import RunHooks
    from rlhf.reward import train_reward

    class StopAtFirstStep(RunHooks):
        def on_step(self, run_id, step, metrics):
            if "loss" in metrics:  # not the untrained model's held-out evaluation at step 0
                self.stop_requested.set()

    ws = make_workspace(tmp_path / "ws", tiny_model_dir)
    stopped = train_reward(ws, ws.load_config(), hooks=StopAtFirstStep())
    assert (stopped.status, stopped.step) == ("stopped", 1)
    app = RlhfApp(ws, ws.load_config(), annotator="t")
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("tab", "tab", "tab")
        table = app.screen.query_one(DataTable)
        assert table.get_row(stopped.run_id)[2:4] == ["stopped", f"1/{db_run(ws, stopped.run_id).total_steps}"]
        await pilot.press("r")
        screen = app.screen
        assert isinstance(screen, RewardScreen)
        await wait_until(pilot, lambda: screen.run_id == stopped.run_id, ENGINE_TIMEOUT_S, "the resumed run")
        assert app.focused is None  # not in the form the screen opened on: s stops the run, not typed into a field
        await wait_until(pilot, lambda: screen.view.feed.final, ENGINE_TIMEOUT_S, "the resumed run to finish")
        row = db_run(ws, stopped.run_id)
        assert screen.view.feed.status == row.status == "finished" and row.step == row.total_steps
        losses = db_metric(ws, stopped.run_id, "loss")
        assert list(losses) == list(range(1, row.total_steps + 1))  # step 1 kept, the rest trained once
        assert screen.view.chart("chart-loss").points["loss"] == losses
