"""Faults inside training runs, through the command line in this process: the GPU runs out of memory, the
disk fills up while weights are saved, a real SIGTERM arrives, a prompt is longer than the model takes. Each
run ends with one line that says what to change, and the last good weights stay on disk and load.

Injected where a real one would strike: out of memory in a training forward (torch.cuda.OutOfMemoryError
can be raised on a CPU build), a full disk as the exact error safetensors raises on ENOSPC, half way through a
save. NaN/inf loss or reward: tests/test_reward.py::test_non_finite_loss_fails_the_run_and_keeps_the_last_good_adapter
and tests/test_ppo.py::test_nan_reward_fails_the_run_and_keeps_the_last_checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError

from fault_kit import assert_one_line_error, tree_snapshot
from rlhf import checkpoints, cli, models, ppo, ppo_trainer, reward, reward_model
from rlhf.checkpoints import CHECKPOINTS_DIR
from rlhf.reward_model import RewardScorer
from rlhf.store import PromptItem, Store

# What safetensors raises when the disk is full (measured on a 64 KiB tmpfs).
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.65 GiB total capacity)"


def _main(capsys, *argv: str | Path) -> tuple[int, str, list[str]]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def _only_problem_line(err_lines: list[str], fragment: str) -> str:
    """The one stderr line about the failure (progress lines come before it), with no traceback anywhere."""
    assert not any("Traceback" in line for line in err_lines), err_lines
    matching = [line for line in err_lines if fragment in line]
    assert len(matching) == 1 and matching[0] == err_lines[-1], err_lines
    return matching[0]


def _scores_finite(ws, run_id: str) -> bool:
    return math.isfinite(RewardScorer.from_run(ws, run_id).score("Hi", " A good boat and a good cake."))


def _raise_on_training_forward(monkeypatch, module, name: str, model_arg: int, nth: int, exc: BaseException) -> None:
    """Make the nth forward in training mode of `module.name` raise `exc` (evaluation forwards pass)."""
    real, seen = getattr(module, name), []

    def forward(*args, **kwargs):
        if args[model_arg].training:
            seen.append(1)
            if len(seen) == nth:
                raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, forward)


def test_reward_out_of_memory_names_the_settings_and_keeps_the_last_good_adapter(labeled, capsys, monkeypatch):
    _raise_on_training_forward(monkeypatch, reward, "raw_scores", 0, 3, torch.cuda.OutOfMemoryError(OOM))
    code, out, err = _main(capsys, "train-reward", "--workspace", labeled.root)
    line = _only_problem_line(err, "failed")
    assert code == 1 and "out of GPU memory at step 3; kept the weights from step 2" in line
    assert "lower [reward] batch_size, now 4, or max_length, now 512" in line and 'quantization = "4bit"' in line
    with Store(labeled.db_path) as store:
        run = store.runs("reward")[-1]
    assert (run.status, run.step) == ("failed", 2) and run.error in line
    assert f"those weights are saved in {labeled.run_dir(run.id) / 'reward'}" in line and out == ""
    assert _scores_finite(labeled, run.id)


def test_out_of_memory_while_loading_the_base_names_the_setting_and_writes_nothing(labeled, tiny_model_dir, capsys,
                                                                                    monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    before = tree_snapshot(labeled.root)
    code, out, err = _main(capsys, "train-reward", "--workspace", labeled.root)
    assert_one_line_error(code, "".join(line + "\n" for line in err),
                          f"{tiny_model_dir}: out of GPU memory loading it with quantization 'none': set "
                          'quantization = "4bit"')
    assert out == "" and tree_snapshot(labeled.root) == before  # no run row for a base that never loaded


def test_reward_disk_full_while_saving_leaves_no_half_model_and_the_previous_one_serves(rewarded, capsys,
                                                                                        monkeypatch):
    ws, previous = rewarded

    def disk_full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(reward_model, "save_file", disk_full)  # the adapter is written, then the score head fails
    code, out, err = _main(capsys, "train-reward", "--workspace", ws.root)
    line = _only_problem_line(err, "error")
    with Store(ws.db_path) as store:
        failed = store.runs("reward")[-1]
        latest = store.latest_run("reward")
    assert code == 2 and out == ""
    assert line == (f"rlhf-tui: error: {ws.run_dir(failed.id) / 'reward'}: cannot save the reward model: "
                    "disk full (free some space); then train again")
    assert failed.status == "failed" and failed.error in line
    assert [p.name for p in ws.run_dir(failed.id).iterdir()] == ["pairs.json"]  # no reward/, no reward.tmp/
    monkeypatch.undo()
    assert latest.id == previous and _scores_finite(ws, previous)  # what PPO will use is intact


def test_reward_disk_full_mid_run_keeps_the_last_checkpoint_and_resumes(labeled, capsys, monkeypatch):
    real_save, calls = checkpoints.save_file, []

    def full_on_the_second_checkpoint(*args, **kwargs):  # 2 files per checkpoint: optimizer, RNG
        calls.append(1)
        if len(calls) == 3:
            raise SafetensorError(DISK_FULL)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", full_on_the_second_checkpoint)
    code, out, err = _main(capsys, "train-reward", "--workspace", labeled.root, "--epochs", "3")
    with Store(labeled.db_path) as store:
        run = store.runs("reward")[-1]
    per_epoch = run.total_steps // 3
    line = _only_problem_line(err, "failed")
    assert code == 1 and out == "" and line == (
        f"reward run {run.id}: failed: cannot write the checkpoint of step {2 * per_epoch}: disk full (free "
        f"some space); the run stopped (last checkpoint: step {per_epoch}). Resume it with "
        f"`rlhf-tui train-reward --resume {run.id}` once there is room")
    assert (run.status, run.checkpoint_step) == ("failed", per_epoch)
    assert _checkpoints(labeled, run.id) == [f"step-{per_epoch}"]  # intact; no half-written one beside it

    monkeypatch.undo()
    code, out, _ = _main(capsys, "train-reward", "--workspace", labeled.root, "--resume", run.id)
    assert code == 0 and out.startswith(f"reward run {run.id}: finished 3 epochs")
    assert _scores_finite(labeled, run.id)


def _checkpoints(ws, run_id: str) -> list[str]:
    return sorted(p.name for p in (ws.run_dir(run_id) / CHECKPOINTS_DIR).iterdir())


def _metric_steps(ws, run_id: str) -> list[int]:
    with Store(ws.db_path) as store:
        return [row["step"] for row in store.metrics(run_id, "score_mean")]


def _latest_ppo_run(ws) -> dict:
    with Store(ws.db_path) as store:
        return store.runs("ppo")[-1]


def test_ppo_out_of_memory_names_the_settings_keeps_the_checkpoint_and_resumes(rewarded, capsys, monkeypatch):
    ws, _ = rewarded
    _raise_on_training_forward(monkeypatch, ppo_trainer, "response_forward", 0, 3, torch.cuda.OutOfMemoryError(OOM))
    code, _, err = _main(capsys, "ppo", "--workspace", ws.root, "--steps", "4")
    run = _latest_ppo_run(ws)
    line = _only_problem_line(err, "failed")
    assert code == 1 and line.startswith(f"ppo run {run.id}: failed: step 3: out of GPU memory; the run stopped "
                                         "(last checkpoint: step 2). Lower --batch-size (now 2) or "
                                         "ppo.max_new_tokens (now 8)")
    assert (run.status, run.step, run.checkpoint_step) == ("failed", 2, 2) and run.error in line
    assert _checkpoints(ws, run.id) == ["step-2"]

    monkeypatch.undo()
    code, out, _ = _main(capsys, "ppo", "--workspace", ws.root, "--resume", run.id)
    assert code == 0 and out.startswith(f"ppo run {run.id}: finished 4 steps")
    assert _metric_steps(ws, run.id) == [1, 2, 3, 4]  # the kept checkpoint loaded; no step counted twice


def test_ppo_disk_full_mid_checkpoint_keeps_the_previous_one_valid(rewarded, capsys, monkeypatch):
    ws, _ = rewarded
    real_save, calls = ppo.save_file, []

    def full_on_the_second_checkpoint(*args, **kwargs):  # 3 files per checkpoint after the policy adapter
        calls.append(1)
        if len(calls) == 4:
            raise SafetensorError(DISK_FULL)
        return real_save(*args, **kwargs)

    for module in (ppo, checkpoints):  # the value head, then the optimizer and RNG states
        monkeypatch.setattr(module, "save_file", full_on_the_second_checkpoint)
    code, _, err = _main(capsys, "ppo", "--workspace", ws.root, "--steps", "4")
    run = _latest_ppo_run(ws)
    line = _only_problem_line(err, "failed")
    assert code == 1 and line == (f"ppo run {run.id}: failed: cannot write the checkpoint of step 4: disk full "
                                  f"(free some space); the run stopped (last checkpoint: step 2). Resume it with "
                                  f"`rlhf-tui ppo --resume {run.id}` once there is room")
    assert (run.status, run.checkpoint_step) == ("failed", 2)
    assert _checkpoints(ws, run.id) == ["step-2"]  # no step-4, no step-4.tmp

    monkeypatch.undo()
    code, out, _ = _main(capsys, "ppo", "--workspace", ws.root, "--resume", run.id)
    assert code == 0 and out.startswith(f"ppo run {run.id}: finished 4 steps")
    assert _checkpoints(ws, run.id) == ["step-2", "step-4"]  # both: a PPO run keeps its newest 3 (ppo.keep_checkpoints)


def test_sigterm_to_train_reward_stops_with_143_and_a_loadable_adapter(labeled, capsys, monkeypatch):
    real_on_step = cli.ConsoleProgress.on_step

    def terminate_on_first_step(self, run_id, step, metrics):
        real_on_step(self, run_id, step, metrics)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the handler runs in this (main) thread

    monkeypatch.setattr(cli.ConsoleProgress, "on_step", terminate_on_first_step)
    code, out, err = _main(capsys, "train-reward", "--workspace", labeled.root, "--epochs", "1000")
    assert code == 128 + signal.SIGTERM
    assert sum("stopping after this step" in line for line in err) == 1 and not any("Traceback" in l for l in err)
    with Store(labeled.db_path) as store:
        run = store.runs("reward")[-1]
    assert out.startswith(f"reward run {run.id}: stopped at step 1/") and "(0 of 1000 epochs)" in out
    assert out.count("\n") == 1 and out.rstrip().endswith(f"`rlhf-tui train-reward --resume {run.id}`")
    assert (run.status, run.step) == ("stopped", 1) and _scores_finite(labeled, run.id)


def test_a_prompt_longer_than_the_model_takes_is_cut_with_a_notice(rewarded, capsys):
    ws, _ = rewarded
    with Store(ws.db_path) as store:
        store.add_prompts([PromptItem("Tell me everything. " * 600, tags=["long"])], source="test")
    config = ws.config_path.read_text(encoding="utf-8")
    ws.config_path.write_text(config.replace("[ppo]\n", '[ppo]\nprompt_tag = "long"\n'), encoding="utf-8")
    code, out, err = _main(capsys, "ppo", "--workspace", ws.root, "--steps", "1")
    assert code == 0, err
    assert "warning: 1 prompts were cut to their last 256 tokens (model.max_prompt_tokens)" in err
    assert _latest_ppo_run(ws).status == "finished"
