"""Which checkpoints a run keeps: the pure choice of steps on hand-made lists, the folders that count as whole,
how many each kind of run keeps, and a real PPO run on the tiny model keeping its newest N through a resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rlhf.checkpoint_folders import (ADAPTER_FILES, CHECKPOINTS_DIR, POLICY_ADAPTER, checkpoint_path, folder_step,
                                     kept_checkpoint_steps, steps_to_keep)
from rlhf.checkpoints import checkpoints_kept
from rlhf.config import Config
from rlhf.errors import ConfigError
from rlhf.hooks import RunHooks
from rlhf.store import Store


@pytest.mark.parametrize(("steps", "latest", "keep", "kept"), [
    ([10, 20, 30, 40], 40, 3, {20, 30, 40}),  # the newest three
    ([10, 20, 30, 40], 40, 1, {40}),  # only the latest
    ([10, 20], 20, 5, {10, 20}),  # fewer than it may keep: all of them
    ([10, 20, 30, 40, 50], 30, 2, {20, 30}),  # 40 and 50 are newer than the one just written: stale
    ([5, 3, 4, 1], 5, 3, {3, 4, 5}),  # order of the listing does not matter
    ([], 7, 3, {7}),  # the first checkpoint (the listing may miss it: it is kept all the same)
])
def test_steps_to_keep_are_the_latest_and_the_newest_older_ones(steps, latest, keep, kept):
    assert steps_to_keep(steps, latest, keep) == kept


def test_folder_step_reads_checkpoint_names_only():
    assert [folder_step(name) for name in ("step-12", "step-0", "step-3.tmp", "step-3.old", "step-", "steps-3",
                                           "step-x")] == [12, 0, None, None, None, None, None]


def write_adapter(folder: Path, adapter: str = POLICY_ADAPTER, files: tuple[str, ...] = ADAPTER_FILES) -> None:
    (folder / adapter).mkdir(parents=True)
    for name in files:
        (folder / adapter / name).write_text("{}")


def test_kept_checkpoint_steps_lists_whole_folders_holding_the_adapter(tmp_path: Path):
    assert kept_checkpoint_steps(tmp_path, POLICY_ADAPTER) == []  # no checkpoints folder yet
    for step in (10, 2, 30):
        write_adapter(checkpoint_path(tmp_path, step))
    write_adapter(checkpoint_path(tmp_path, 40), files=ADAPTER_FILES[:1])  # no weights: not whole
    write_adapter(checkpoint_path(tmp_path, 50), adapter="reward")  # another adapter
    write_adapter(tmp_path / CHECKPOINTS_DIR / "step-60.tmp")  # a write's leftover
    assert kept_checkpoint_steps(tmp_path, POLICY_ADAPTER) == [2, 10, 30]
    assert kept_checkpoint_steps(tmp_path, "reward") == [50]


def test_ppo_runs_keep_their_setting_and_other_runs_their_latest():
    assert checkpoints_kept("ppo", Config().override({"ppo.keep_checkpoints": 5}).to_dict()) == 5
    assert checkpoints_kept("ppo", {"ppo": {}}) == 3  # a run stored before the setting existed: the default
    assert checkpoints_kept("reward", Config().override({"ppo.keep_checkpoints": 5}).to_dict()) == 1


@pytest.mark.parametrize(("value", "message"), [
    (0, "ppo.keep_checkpoints must be >= 1, got 0"),
    (10**7, "ppo.keep_checkpoints must be <= 1000000, got 10000000"),
    (2.5, "ppo.keep_checkpoints must be int, got 2.5"),
])
def test_keep_checkpoints_is_bounded(value, message):
    with pytest.raises(ConfigError, match=message):
        Config().override({"ppo.keep_checkpoints": value})


# -- a real PPO run -----------------------------------------------------------------------------------

class StopAfter(RunHooks):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def on_step(self, run_id, step, metrics):
        if step >= self.steps:
            self.stop_requested.set()


@pytest.mark.slow
def test_a_ppo_run_keeps_its_newest_checkpoints_through_a_resume(tmp_path: Path, tiny_model_dir: Path):
    from rlhf.ppo import run_ppo
    from rlhf.reward import train_reward
    from tools.tiny import hidden_rule_pairs, workspace_with_pairs

    settings = ("[sampling]\nmax_new_tokens = 8\n[reward]\nepochs = 1\nbatch_size = 4\n"
                "[ppo]\nsteps = 5\nbatch_size = 2\nminibatches = 1\nppo_epochs = 1\nmax_new_tokens = 8\n"
                "checkpoint_every = 1\nkeep_checkpoints = 2\n")
    ws = workspace_with_pairs(tmp_path / "ws", tiny_model_dir, hidden_rule_pairs(num_prompts=6, pairs_per_prompt=2),
                              settings)
    reward = train_reward(ws, ws.load_config())
    stopped = run_ppo(ws, ws.load_config(), reward_run=reward.run_id, hooks=StopAfter(3))
    run_dir = ws.run_dir(stopped.run_id)
    assert (stopped.status, kept_checkpoint_steps(run_dir, POLICY_ADAPTER)) == ("stopped", [2, 3])

    # As if a kill had come after the checkpoint of step 6 was written but before the row named it (and a write's
    # temp folder was left behind): the run still resumes from step 3, and those folders are not its history.
    shutil.copytree(checkpoint_path(run_dir, 3), checkpoint_path(run_dir, 6))
    shutil.copytree(checkpoint_path(run_dir, 3), run_dir / CHECKPOINTS_DIR / "step-4.tmp")
    resumed = run_ppo(ws, Config(), resume_run=stopped.run_id, hooks=StopAfter(4))
    assert (resumed.status, resumed.step) == ("stopped", 4)
    assert sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir()) == ["step-3", "step-4"]

    finished = run_ppo(ws, Config(), resume_run=stopped.run_id)
    with Store(ws.db_path) as store:
        run = store.run(stopped.run_id)
    assert (finished.status, run.checkpoint_step, Path(run.checkpoint)) == ("finished", 5, checkpoint_path(run_dir, 5))
    assert kept_checkpoint_steps(run_dir, POLICY_ADAPTER) == [4, 5]
