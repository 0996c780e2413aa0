"""Second reliability pass: an export that could erase the labels, foreign code through a run folder, two
processes training one run, and a closed terminal or an early Ctrl+C during a run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from fault_kit import StopAfter, assert_one_line_error, start_rlhf_tui, tree_snapshot
from rlhf.cli import main
from rlhf.config import Workspace
from rlhf.errors import RunCancelled
from rlhf.hooks import RunHooks
from rlhf.locks import RUN_LOCK_FILE, run_lock
from rlhf.ppo import LOCK_FILE, run_ppo
from rlhf.reward import train_reward
from rlhf.store import Store


def cli(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- export never writes over what it exports from ------------------------------------------------------


@pytest.mark.parametrize("name", ["rlhf.db", "rlhf.toml", "runs/pairs.jsonl", "link-to-db", "hardlink-to-db"])
def test_export_refuses_the_workspaces_own_files(labeled: Workspace, capsys, name):
    ws = labeled
    (ws.root / "link-to-db").symlink_to(ws.db_path)
    os.link(ws.db_path, ws.root / "hardlink-to-db")
    ws.runs_dir.mkdir()
    before = tree_snapshot(ws.root)
    code, out, err = cli(capsys, "export", ws.root / name, "--workspace", ws.root)
    assert_one_line_error(code, err, "this workspace's own state", "export to a new file name")
    assert out == "" and tree_snapshot(ws.root) == before
    assert cli(capsys, "stats", "--workspace", ws.root)[1].startswith("prompts: 8")


def test_export_refuses_to_write_over_another_sqlite_database(labeled: Workspace, tmp_path: Path, capsys):
    other = tmp_path / "other.db"
    shutil.copy(labeled.db_path, other)
    before = other.read_bytes()
    code, _, err = cli(capsys, "export", other, "--workspace", labeled.root)
    assert_one_line_error(code, err, "is a SQLite database")
    assert other.read_bytes() == before


def test_export_through_a_symlink_writes_its_target_and_keeps_the_link(labeled: Workspace, tmp_path: Path, capsys):
    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n")
    link.symlink_to(target)
    code, out, _ = cli(capsys, "export", link, "--workspace", labeled.root)
    assert code == 0 and "exported 24 pairs" in out
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(target.read_text().splitlines()) == 24


def test_export_into_a_fifo_writes_into_it(labeled: Workspace, tmp_path: Path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    code, out, _ = cli(capsys, "export", fifo, "--workspace", labeled.root)
    reader.join(timeout=30)
    assert code == 0 and "exported 24 pairs" in out
    assert len(received[0].splitlines()) == 24 and stat.S_ISFIFO(fifo.lstat().st_mode)


def test_export_to_stdout_keeps_the_summary_off_the_pipe(labeled: Workspace, capsys):
    code, out, err = cli(capsys, "export", "-", "--workspace", labeled.root)
    assert code == 0 and err == "exported 24 pairs to -\n"
    assert [sorted(json.loads(line)) for line in out.splitlines()] == [["chosen", "prompt", "rejected"]] * 24


def _char_device(path: Path, minor: int) -> Path:
    """A copy of /dev/null (minor 3) or /dev/full (minor 7) in a test folder: a broken export must not be able
    to replace the system's own."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return path


def test_export_to_a_device_writes_into_it_and_a_full_one_says_disk_full(labeled: Workspace, tmp_path: Path,
                                                                           capsys):
    null = _char_device(tmp_path / "null", 3)
    code, out, _ = cli(capsys, "export", null, "--workspace", labeled.root)
    assert code == 0 and "exported 24 pairs" in out
    assert stat.S_ISCHR(null.lstat().st_mode)
    full = _char_device(tmp_path / "full", 7)
    code, _, err = cli(capsys, "export", full, "--workspace", labeled.root)
    assert_one_line_error(code, err, "disk full")
    assert stat.S_ISCHR(full.lstat().st_mode)


# -- foreign code and paths through --reward ----------------------------------------------------------------


def _model_with_remote_code(src: Path, dest: Path, marker: Path) -> Path:
    """A copy of a model whose config asks for its own Python code, which would write `marker` if it ran."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config |= {"model_type": "evil_llama", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                        "AutoModelForCausalLM": "evil.EvilModel"}}
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                  "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
                                  "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return dest


def test_score_and_export_reward_take_only_runs_of_this_workspace(rewarded, tmp_path: Path, capsys):
    ws, reward_run = rewarded
    outside = tmp_path / "outside"
    shutil.copytree(ws.run_dir(reward_run), outside)
    relative = os.path.relpath(outside, ws.runs_dir)
    for command in (["score", "--reward", relative, "hi", "there"],
                    ["export-reward", "--reward", relative, tmp_path / "out"]):
        code, _, err = cli(capsys, *command, "--workspace", ws.root)
        assert_one_line_error(code, err, f"no run {relative!r}")
    assert not (tmp_path / "out").exists()


def test_remote_code_named_by_a_run_folder_never_runs(rewarded, tiny_model_dir: Path, tmp_path: Path, capsys):
    ws, reward_run = rewarded
    marker = tmp_path / "remote-code-ran"
    evil = _model_with_remote_code(tiny_model_dir, tmp_path / "evil-model", marker)
    meta_path = ws.run_dir(reward_run) / "reward" / "reward.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"] = str(evil)
    meta["config"]["model"]["trust_remote_code"] = True  # what a received run folder may claim
    meta_path.write_text(json.dumps(meta))
    code, _, err = cli(capsys, "score", "--reward", reward_run, "hi", "there", "--workspace", ws.root)
    assert_one_line_error(code, err, str(evil), "trust_remote_code")
    assert not marker.exists()


def test_a_pickle_adapter_is_never_loaded(rewarded, capsys):
    ws, reward_run = rewarded
    adapter = ws.run_dir(reward_run) / "reward" / "adapter"
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    code, _, err = cli(capsys, "score", "--reward", reward_run, "hi", "there", "--workspace", ws.root)
    assert_one_line_error(code, err, "only a pickle adapter_model.bin, which is not loaded")


# -- one process per run --------------------------------------------------------------------------------------


def test_a_reward_run_resumes_in_one_process_at_a_time(labeled: Workspace, capsys):
    ws = labeled
    cfg = ws.load_config().override({"reward.epochs": 4})
    stopped = train_reward(ws, cfg, hooks=StopAfter(3))
    assert stopped.status == "stopped"
    with Store(ws.db_path) as store:
        before = store.run(stopped.run_id)
    with run_lock(ws.run_dir(stopped.run_id), stopped.run_id):  # as another resume holds it
        code, _, err = cli(capsys, "train-reward", "--resume", stopped.run_id, "--workspace", ws.root)
        assert_one_line_error(code, err, f"run {stopped.run_id!r} is already being trained by another process")
    with Store(ws.db_path) as store:
        assert store.run(stopped.run_id) == before
    assert not (ws.run_dir(stopped.run_id) / RUN_LOCK_FILE).exists()
    resumed = train_reward(ws, cfg, resume_run=stopped.run_id)
    assert resumed.status == "finished", resumed.message
    assert not (ws.run_dir(stopped.run_id) / RUN_LOCK_FILE).exists()


# -- stop requests that come early, and a terminal that goes away ----------------------------------------------


def _stopped_already() -> RunHooks:
    hooks = RunHooks()
    hooks.stop_requested.set()  # Ctrl+C while the model was loading
    return hooks


def test_a_stop_while_loading_leaves_no_run_behind(rewarded):
    ws, _ = rewarded
    with Store(ws.db_path) as store:
        runs_before = store.runs()
    files_before = tree_snapshot(ws.runs_dir)
    with pytest.raises(RunCancelled, match="stopped before its first step"):
        run_ppo(ws, ws.load_config(), hooks=_stopped_already())
    with pytest.raises(RunCancelled, match="stopped before its first step"):
        train_reward(ws, ws.load_config(), hooks=_stopped_already())
    with Store(ws.db_path) as store:
        assert store.runs() == runs_before
    assert tree_snapshot(ws.runs_dir) == files_before


def test_a_stop_while_a_resume_loads_leaves_the_run_as_it_was(labeled: Workspace):
    ws = labeled
    cfg = ws.load_config().override({"reward.epochs": 4})
    stopped = train_reward(ws, cfg, hooks=StopAfter(2))
    with Store(ws.db_path) as store:
        before = store.run(stopped.run_id)
    with pytest.raises(RunCancelled):
        train_reward(ws, cfg, hooks=_stopped_already(), resume_run=stopped.run_id)
    with Store(ws.db_path) as store:
        assert store.run(stopped.run_id) == before


def test_sighup_stops_a_headless_run_with_a_checkpoint(rewarded):
    """A closed terminal or dropped SSH session: the run stops after its step with a checkpoint, as Ctrl+C does,
    even though nothing can be printed any more."""
    ws, _ = rewarded
    proc = start_rlhf_tui("ppo", "--workspace", ws.root, "--steps", "50", "--batch-size", "2")
    seen = []
    while not any("s/step" in line for line in seen) and proc.poll() is None:
        seen.append(proc.stderr.readline())
    assert " 1/50 " in seen[-1], "".join(seen)
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    proc.stdout.close()  # the terminal is gone: nobody reads what the run prints
    proc.stderr.close()
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    with Store(ws.db_path) as store:
        run = store.runs("ppo")[-1]
    assert run.status == "stopped" and run.checkpoint_step == run.step >= 1
    assert Path(run.checkpoint).is_dir()
    assert not (ws.runs_dir / LOCK_FILE).exists()
