"""kill -9 of headless training commands (the same code the engine runs for the app): the next start marks
the run interrupted, the database checks clean, the last checkpoint loads and `--resume` continues.

Covered elsewhere: the app killed mid-labeling (every decision on disk, integrity_check ok, no engine left),
tests/test_label_screen.py::test_sigkill_mid_labeling_loses_no_decision_and_leaves_no_engine; the engine killed
during a PPO run started from the app, tests/test_train_screen.py::test_engine_killed_mid_run_marks_the_run_interrupted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3

from fault_kit import LineFollower, network_sockets, rlhf_tui, start_rlhf_tui
from rlhf import cli
from rlhf.ppo import LOCK_FILE
from rlhf.store import Store

PROGRESS = re.compile(r"\] (\d+)/(\d+) ")  # a progress line off a terminal: "[####----] 3/100  4s ..."


def _progress_step(line: str) -> int:
    match = PROGRESS.search(line)
    return int(match.group(1)) if match else -1


def _kill_9(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL


def _integrity(db_path) -> list:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def _listed_run(ws, run_id: str) -> dict:
    """The run as `rlhf-tui runs --json` shows it: the first command started after the kill."""
    done = rlhf_tui("runs", "--json", "--workspace", ws.root)
    assert done.returncode == 0, done.stderr
    return next(run for run in json.loads(done.stdout) if run["id"] == run_id)


def test_kill_9_during_reward_training_then_resume_finishes_the_run(labeled, capsys):
    proc = start_rlhf_tui("train-reward", "--workspace", labeled.root, "--epochs", "60")
    try:
        # Off a terminal a progress line comes after each epoch's held-out evaluation, which is followed by a
        # checkpoint: at the second line, the first epoch's checkpoint is on disk.
        progress = LineFollower(proc.stderr)
        first = _progress_step(progress.wait_for(lambda line: _progress_step(line) > 0))
        progress.wait_for(lambda line: _progress_step(line) > first)
        _kill_9(proc)
    finally:
        proc.kill()
    with Store(labeled.db_path) as store:  # opening a store alone changes nothing: the commands mark runs
        (run,) = store.runs("reward")
    assert run.status == "running" and run.pid == proc.pid and run.checkpoint_step >= first
    assert _integrity(labeled.db_path) == [("ok",)]

    listed = _listed_run(labeled, run.id)
    assert listed["status"] == "interrupted" and "killed or crashed" in listed["error"] and listed["ended_at"]
    assert not (labeled.run_dir(run.id) / "reward").exists()  # nothing half-written passes for a model
    assert cli.main(["ppo", "--workspace", str(labeled.root)]) == 2
    assert "no finished reward run" in capsys.readouterr().err  # PPO never picks the interrupted run

    assert cli.main(["train-reward", "--workspace", str(labeled.root), "--resume", run.id]) == 0
    out, err = capsys.readouterr()
    assert f"(resuming at step {run.checkpoint_step})" in err and "Traceback" not in err
    assert out.startswith(f"reward run {run.id}: finished 60 epochs ({run.total_steps} steps)")
    with Store(labeled.db_path) as store:
        after, latest = store.run(run.id), store.latest_run("reward")
        losses = [row["step"] for row in store.metrics(run.id, "loss")]
    assert after.status == "finished" and latest.id == run.id  # now PPO's reward model
    assert losses == list(range(1, run.total_steps + 1))  # steps after the checkpoint redone once


def test_kill_9_during_ppo_then_resume_continues_from_the_last_checkpoint(rewarded, capsys, monkeypatch):
    ws, _ = rewarded
    proc = start_rlhf_tui("ppo", "--workspace", ws.root, "--steps", "100")
    try:
        LineFollower(proc.stderr).wait_for(lambda line: _progress_step(line) >= 3)  # step 2 is checkpointed
        assert network_sockets(proc.pid) == []  # nothing listens, even mid-run
        # A second PPO run on the workspace while this one runs: refused, in one line.
        assert cli.main(["ppo", "--workspace", str(ws.root)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"another PPO run (pid {proc.pid}) is running in {ws.root}: stop it first" in err
        _kill_9(proc)
    finally:
        proc.kill()
    with Store(ws.db_path) as store:
        (run,) = store.runs("ppo")
    assert run.status == "running" and run.checkpoint_step >= 2 and run.step >= 3
    assert (ws.runs_dir / LOCK_FILE).read_text() == str(proc.pid)  # a stale lock: its owner is gone
    assert _integrity(ws.db_path) == [("ok",)]
    assert _listed_run(ws, run.id)["status"] == "interrupted"

    real_on_step = cli.ConsoleProgress.on_step

    def ctrl_c_after_the_first_step(self, run_id, step, metrics):
        real_on_step(self, run_id, step, metrics)
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl+C: the handler runs in this (main) thread

    monkeypatch.setattr(cli.ConsoleProgress, "on_step", ctrl_c_after_the_first_step)
    code = cli.main(["ppo", "--workspace", str(ws.root), "--resume", run.id])
    out, err = capsys.readouterr()
    resumed_at, stopped_at = run.checkpoint_step, run.checkpoint_step + 1
    assert code == 130, err
    assert f"{run.id}: 100 steps (resuming at step {resumed_at})" in err and "Traceback" not in err
    assert out.splitlines() == [f"ppo run {run.id}: stopped at step {stopped_at}/100; checkpoint "
                                f"{ws.run_dir(run.id) / 'checkpoints' / f'step-{stopped_at}'}; "
                                f"resume with `rlhf-tui ppo --resume {run.id}`"]
    with Store(ws.db_path) as store:
        after = store.run(run.id)
        steps = [row["step"] for row in store.metrics(run.id, "score_mean")]
    assert (after.status, after.checkpoint_step) == ("stopped", stopped_at)
    assert steps == list(range(1, stopped_at + 1))  # rows past the checkpoint were redone once, not duplicated
    assert not (ws.runs_dir / LOCK_FILE).exists()
