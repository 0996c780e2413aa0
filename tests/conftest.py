"""Shared fixtures: one tiny random Llama per test session, and a fresh workspace + store per test.

tools.tiny (and so torch) is imported inside the fixture: tests that never ask for a model collect fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from rlhf.config import Workspace
from rlhf.store import Store

# One intra-op thread (set before torch loads; inherited by engine subprocesses): on the shared 2-core
# box, torch's default of 2 OpenMP threads made a 63-step reward training take 66 s instead of 4.3 s,
# as its threads spin-wait for each other whenever another process holds a core.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped where torch sees no CUDA device (torch loads only if there are any)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU: benchmarks/gpu_check.sh runs these on one")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama with a 384-token byte-level BPE and a chat template."""
    from tools.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`family_dirs(family)`: that family's tiny random model (a key of tools.tiny.FAMILIES), built on first use
    and shared by the whole session: tests that change its files work on a copy."""
    from tools.tiny import build_tiny_model

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(family), family)
        return built[family]

    return get


@pytest.fixture
def workspace(tmp_path: Path, tiny_model_dir: Path) -> Workspace:
    """An empty workspace whose rlhf.toml points [model] name at the tiny model."""
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    ws.config_path.write_text(f'[model]\nname = "{tiny_model_dir.as_posix()}"\n', encoding="utf-8")
    return ws


@pytest.fixture
def store(workspace: Workspace):
    with Store(workspace.db_path) as db:
        yield db
