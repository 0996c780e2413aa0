"""Fixtures of the reliability suite: a labeled workspace, and one with a finished reward run (trained once
per session, copied for each test so that no test sees another's runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fault_kit import make_labeled_workspace
from rlhf.config import Workspace


@pytest.fixture
def labeled(tmp_path: Path, tiny_model_dir: Path) -> Workspace:
    return make_labeled_workspace(tmp_path / "ws", tiny_model_dir)


@pytest.fixture(scope="session")
def rewarded_template(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Workspace, str]:
    from rlhf.reward import train_reward

    ws = make_labeled_workspace(tmp_path_factory.mktemp("rewarded") / "ws", tiny_model_dir)
    result = train_reward(ws, ws.load_config())
    assert result.status == "finished", result.message
    return ws, result.run_id


@pytest.fixture
def rewarded(tmp_path: Path, rewarded_template: tuple[Workspace, str]) -> tuple[Workspace, str]:
    """A workspace of this test's own with 24 labeled pairs and a finished reward run (its id)."""
    template, reward_run = rewarded_template
    shutil.copytree(template.root, tmp_path / "ws")
    return Workspace(tmp_path / "ws"), reward_run
