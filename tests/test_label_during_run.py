"""Labeling while a PPO run trains, and the refit switch: the Label screen (Pilot) against a real engine process
and the tiny model. Pairs keep coming from the run's own policy between its steps, each decision carries the run
and step; `f` refits the reward model on the labels so far and the run switches to it at its next checkpoint, or
keeps its reward (and says so) when the refit fails."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from rlhf import cli
from rlhf.active import run_reward_judge
from rlhf.agreement import reward_model_check
from rlhf.config import Config, Workspace
from rlhf.hooks import RunHooks
from rlhf.sampling import PairSampler
from rlhf.engine import protocol
from rlhf.refit import SWITCH_REQUEST_FILE, preserved_rng, reward_run_at
from rlhf.reward_model import RewardScorer
from rlhf.store import Store
from rlhf_tui.app.main import RlhfApp
from rlhf_tui.app.screens.label import LabelScreen
from test_label_screen import wait_ready_to_decide
from test_ppo import TIMINGS
from test_reward_screen import ENGINE_TIMEOUT_S, db_metric, db_run, make_workspace, wait_until

# Tiny PPO: 4 prompts a step, 8 new tokens, one epoch, a checkpoint every 2 steps; long enough to label during.
PPO_TOML = ("[ppo]\nsteps = 300\nbatch_size = 4\nminibatches = 2\nppo_epochs = 1\nmax_new_tokens = 8\n"
            "checkpoint_every = 2\n")
PROMPT = "How do I boil eggs?"


def test_reward_run_at_takes_the_latest_reward_from_at_or_before_that_step():
    history = [{"from_step": 10, "reward_run": "r2"}, {"from_step": 0, "reward_run": "r0"},
               {"from_step": 4, "reward_run": "r1"}]
    assert reward_run_at(history, 0) == "r0"
    assert reward_run_at(history, 3) == "r0"
    assert reward_run_at(history, 4) == "r1"  # a switch at checkpoint 4 scores steps 5, 6, ...
    assert reward_run_at(history, 9) == "r1"
    assert reward_run_at(history, 12) == "r2"
    assert reward_run_at(history[1:2], 12) == "r0"


def test_preserved_rng_puts_torch_and_python_streams_back():
    torch.manual_seed(7)
    random.seed(7)
    expected = (torch.rand(3).tolist(), random.random())
    torch.manual_seed(7)
    random.seed(7)
    with preserved_rng():
        torch.manual_seed(123)  # what sampling a labeling pair does
        random.seed(123)
        torch.rand(5)
    assert (torch.rand(3).tolist(), random.random()) == expected


class PairsBetweenSteps(RunHooks):
    """Samples a labeling pair from the run's live policy after every step and judges it with the run's reward, as
    the engine's hooks do; keeps each pair's answers and scores."""

    def __init__(self, ws: Workspace, cfg: Config, keep_rng: bool) -> None:
        super().__init__()
        self.ws, self.cfg, self.keep_rng, self.sampler, self.judge = ws, cfg, keep_rng, None, None
        self.judged: list[tuple[list[str], list[float]]] = []

    def on_policy(self, run_id, model, tokenizer) -> None:
        self.sampler = PairSampler(model, tokenizer, self.cfg.sampling, self.cfg.model.max_prompt_tokens)

    def on_reward(self, run_id, reward_run, reward) -> None:
        self.judge = run_reward_judge(self.ws, reward_run, reward, self.sampler.tokenizer)

    def on_step(self, run_id, step, metrics) -> None:
        with preserved_rng() if self.keep_rng else nullcontext():
            answers = [answer.text for answer in self.sampler.sample(PROMPT, None, prompt_id=1, draw=step).answers]
            (scores,) = self.judge.score(PROMPT, None, answers)
        self.judged.append((answers, scores))


def run_metrics(ws: Workspace, cfg: Config, reward_run: str, hooks: RunHooks | None = None) -> dict:
    from rlhf.ppo import run_ppo

    result = run_ppo(ws, cfg, reward_run=reward_run, hooks=hooks)
    assert result.status == "finished", result.message
    return {step: {name: value for name, value in values.items() if name not in TIMINGS}
            for step, values in db_metric_rows(ws, result.run_id).items()}


def db_metric_rows(ws: Workspace, run_id: str) -> dict[int, dict[str, float]]:
    with Store(ws.db_path) as store:
        return store.metrics_by_step(run_id)


def test_labeling_between_steps_leaves_the_run_as_it_would_have_been(rewarded):
    ws, reward_run = rewarded
    cfg = ws.load_config().override({"ppo.steps": 3, "ppo.checkpoint_every": 3})
    plain = run_metrics(ws, cfg, reward_run)
    labeled = PairsBetweenSteps(ws, cfg, keep_rng=True)
    assert run_metrics(ws, cfg, reward_run, labeled) == plain and len(labeled.judged) == 3
    # Judged by the run's reward on the policy's own base (its adapter, switched to and back), on the scale the
    # reward run scores on alone.
    assert labeled.judge.run_ids == [reward_run] and labeled.judge.judges[0].head is not None
    alone = RewardScorer.from_run(ws, reward_run, cfg)
    for answers, scores in labeled.judged:
        assert scores == pytest.approx(alone.score_many([(PROMPT, answer) for answer in answers]), abs=1e-4)
    # Without preserved_rng, the pairs' seeds would steer the run's sampling.
    assert run_metrics(ws, cfg, reward_run, PairsBetweenSteps(ws, cfg, keep_rng=False)) != plain


def test_a_reward_on_a_base_of_its_own_judges_the_pairs_between_steps(rewarded, tmp_path):
    """A reward model that cannot share the policy's base (here trained on it in 4-bit, while the policy runs in
    full precision) scores PPO's rollouts as a model of its own (SeparateReward); the pairs sampled between the
    steps are judged by that model, on the scale it scores on alone."""
    from rlhf.reward import train_reward

    source, _ = rewarded
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(source.root, ws.root)
    other = train_reward(ws, ws.load_config().override({"reward.quantization": "4bit", "reward.epochs": 1}))
    assert other.status == "finished", other.message
    cfg = ws.load_config().override({"ppo.steps": 2, "ppo.checkpoint_every": 2})
    labeled = PairsBetweenSteps(ws, cfg, keep_rng=True)
    run_metrics(ws, cfg, other.run_id, labeled)
    assert labeled.judge.run_ids == [other.run_id] and labeled.judge.judges[0].scorer is not None  # its own model
    alone = RewardScorer.from_run(ws, other.run_id, cfg)
    assert len(labeled.judged) == 2
    for answers, scores in labeled.judged:
        assert scores == pytest.approx(alone.score_many([(PROMPT, answer) for answer in answers]), abs=1e-4)


@pytest.fixture(scope="module")
def rewarded(tmp_path_factory, tiny_model_dir):
    """A workspace with 80 labeled pairs and a finished one-epoch reward run (trained in this process)."""
    from rlhf.reward import train_reward

    ws = make_workspace(tmp_path_factory.mktemp("during") / "ws", tiny_model_dir, PPO_TOML)
    result = train_reward(ws, ws.load_config().override({"reward.epochs": 1}))
    assert result.status == "finished", result.message
    return ws, result.run_id


def db_rows(ws, sql: str, params=()) -> list[dict]:
    with Store(ws.db_path) as store:
        return list(store.db.query(sql, params))


async def label_one_run_pair(pilot, screen: LabelScreen, run_id: str) -> int:
    """Decide pairs until one sampled by the run has been decided (the first may be the labeling model's); the
    step it was sampled after."""
    while True:
        await wait_ready_to_decide(pilot, screen, ENGINE_TIMEOUT_S, "a pair during the run")
        from_run, step = screen.current.run_id == run_id, screen.current.run_step
        if from_run:  # the status line names the policy that sampled the pair on screen
            status = str(screen.query_one("#status").content)
            assert f"model {screen.engine_info.model_label} ({run_id} after step {step})" in status
        await pilot.press("a")
        if from_run:
            return step


def run_decisions(ws: Workspace) -> list[dict]:
    return db_rows(ws, "SELECT c.id, c.run_id, c.run_step, c.reward_run, c.reward_margin, r.run_checkpoint, "
                       "r.adapter FROM comparisons c JOIN responses r ON r.id = c.response_a_id "
                       "WHERE c.run_id IS NOT NULL")


async def test_labeling_continues_during_ppo_and_a_refit_switches_its_reward(rewarded, capsys):
    ws, reward_run = rewarded
    cfg = ws.load_config()
    app = RlhfApp(ws, cfg, annotator="t")
    async with app.run_test(size=(120, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, LabelScreen)
        await wait_until(pilot, lambda: screen.engine_info is not None, ENGINE_TIMEOUT_S, "the engine")
        assert not screen.check_action("refit", ())  # no PPO run: the refit key is off (and out of the footer)
        app.engine.send(protocol.StartPPO(config=cfg, reward_run=reward_run))
        await wait_until(pilot, lambda: screen.ppo_run is not None, ENGINE_TIMEOUT_S, "the PPO run")
        run_id = screen.ppo_run

        # Labeling goes on: pairs from the run's policy, each decision stored with the run and step.
        for _ in range(2):
            await label_one_run_pair(pilot, screen, run_id)
        decided = run_decisions(ws)
        assert len(decided) >= 2 and {row["run_id"] for row in decided} == {run_id}
        assert all(row["run_step"] >= 1 and row["adapter"] is None for row in decided)
        # Each judged by the reward the run optimises, and counted in the agreement figures.
        assert all(row["reward_run"] == reward_run and row["reward_margin"] is not None for row in decided)
        with Store(ws.db_path) as store:
            judged = {row["id"] for row in store.reward_margins(1000)}
            check = reward_model_check(store, 1000)
        assert {row["id"] for row in decided} <= judged and check["n"] == len(judged)

        # A refit that fails (no labels to train on) leaves the run with its reward, and says so.
        kept = db_rows(ws, "SELECT * FROM comparisons")
        with Store(ws.db_path) as store:
            store.db.execute("DELETE FROM comparisons")
            store.db.conn.commit()
        assert screen.check_action("refit", ())
        await pilot.press("f")
        await wait_until(pilot, lambda: screen.refit.stage == "failed", ENGINE_TIMEOUT_S, "the failed refit")
        assert f"keeps scoring with reward run {reward_run}" in screen.refit.message
        assert db_rows(ws, "SELECT * FROM run_rewards") == []

        # Labels back: the refit trains, and the run switches to it at its next checkpoint.
        with Store(ws.db_path) as store:
            store.db["comparisons"].insert_all(kept)
            store.db.conn.commit()
        await pilot.press("f")
        await wait_until(pilot, lambda: screen.refit.stage == "switched", ENGINE_TIMEOUT_S, "the switch")
        refit_run = screen.refit.reward_run
        assert db_run(ws, refit_run).status == "finished" and refit_run != reward_run
        (switch,) = db_rows(ws, "SELECT from_step, reward_run FROM run_rewards WHERE run_id = ?", [run_id])
        assert switch["reward_run"] == refit_run and switch["from_step"] % 2 == 0  # at a checkpoint
        assert db_metric(ws, run_id, "reward_switch") == {switch["from_step"]: 1.0}
        await wait_until(pilot, lambda: db_run(ws, run_id).step > switch["from_step"], ENGINE_TIMEOUT_S,
                         "a step scored by the refit")
        # A pair sampled after a step the refit scored is judged by the refit: each by the reward of its step.
        while await label_one_run_pair(pilot, screen, run_id) <= switch["from_step"]:
            pass
        history = [{"from_step": 0, "reward_run": reward_run}, switch]
        decided = run_decisions(ws)
        assert {row["reward_run"] for row in decided} == {reward_run, refit_run}
        assert all(row["reward_run"] == reward_run_at(history, row["run_step"] - 1) for row in decided)

        app.engine.send(protocol.StopRun(run_id))
        await wait_until(pilot, lambda: screen.ppo_run is None, ENGINE_TIMEOUT_S, "the stop")
        assert db_run(ws, run_id).status == "stopped"

    # Headless, the run says which reward run scored which steps.
    assert cli.main(["runs", "show", run_id, "--workspace", str(ws.root)]) == 0
    assert (f"scored by: {reward_run} from step 1, {refit_run} from step {switch['from_step'] + 1}"
            in capsys.readouterr().out)
    assert cli.main(["runs", "show", run_id, "--workspace", str(ws.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scored_by"] == [
        {"reward_run": reward_run, "first_step": 1}, {"reward_run": refit_run, "first_step": switch["from_step"] + 1}]


def test_headless_refit_switches_a_running_headless_ppo_run(rewarded, tmp_path, capsys):
    """`rlhf-tui refit` beside a headless `rlhf-tui ppo`: a reward model trained on every label, that the PPO run
    switches to at its next checkpoint, as `runs show` then says. With no PPO run training it is one line."""
    source, reward_run = rewarded
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(source.root, ws.root)
    assert cli.main(["refit", "--workspace", str(ws.root)]) == 2
    assert capsys.readouterr().err.startswith("rlhf-tui: error: no PPO run is training: refit switches")

    with Store(ws.db_path) as store:
        earlier = {run.id for run in store.runs("ppo")}  # the module's other tests ran PPO in this workspace
    root = Path(__file__).resolve().parents[1]
    # Far more steps than the test lasts (it stops the run): the run must still train when the refit is ready.
    ppo = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "--workspace", str(ws.root), "ppo", "--reward",
                            reward_run, "--steps", "100000"], text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(root)})

    def ppo_run():
        with Store(ws.db_path) as store:
            return next((run for run in store.runs("ppo") if run.id not in earlier), None)

    def history(run_id: str) -> list[dict]:
        with Store(ws.db_path) as store:
            return store.reward_history(run_id)

    try:
        deadline = time.monotonic() + 240
        while (run := ppo_run()) is None or run.step < 1:
            assert ppo.poll() is None and time.monotonic() < deadline, ppo.communicate()
            time.sleep(0.2)
        code = cli.main(["refit", "--workspace", str(ws.root)])
        out, err = capsys.readouterr()
        assert code == 0, err
        refit = out.split("switches to reward run ")[1].split()[0]
        assert out.startswith(f"reward run {refit}: finished 1 epoch")
        while len(history(run.id)) < 2:
            assert ppo.poll() is None and time.monotonic() < deadline + 120, ppo.communicate()
            time.sleep(0.2)
    finally:
        ppo.send_signal(signal.SIGTERM)
        _, err = ppo.communicate(timeout=240)
    switched = history(run.id)[1]
    assert [row["reward_run"] for row in history(run.id)] == [reward_run, refit]
    assert switched["from_step"] % 2 == 0  # at a checkpoint (checkpoint_every = 2)
    assert f"step {switched['from_step']}: PPO scores with the refit reward run {refit}" in err
    assert not (ws.run_dir(run.id) / SWITCH_REQUEST_FILE).exists()  # taken once
    assert cli.main(["runs", "show", run.id, "--workspace", str(ws.root)]) == 0
    assert f"scored by: {reward_run} from step 1, {refit} from step {switched['from_step'] + 1}" in \
        capsys.readouterr().out
