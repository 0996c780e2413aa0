"""Security: weights and checkpoints are safetensors (no pickle written or loaded), remote code stays off, and
no code path opens a listening socket.

Covered elsewhere: every model load passes trust_remote_code=False (unless set) and use_safetensors=True, and
a folder with only pickle weights is refused (tests/test_models.py:
test_remote_code_off_and_safetensors_only_by_default, test_directory_without_tokenizer_or_weights). No
listening socket at run time: the app with two engines (test_fault_sessions.py), a headless PPO run
(test_fault_kill.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from rlhf.ppo import run_ppo

ROOT = Path(__file__).resolve().parents[2]
PICKLE_MAGIC = b"\x80"  # protocol 2+ pickles start with PROTO
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format: a zip of pickles

# Source patterns that would load pickled weights, run checkpoint code or serve on a port.
FORBIDDEN = {
    r"\btorch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True unpickles arbitrary code",
    r"\bimport pickle\b|\bpickle\.loads?\(|\bimport (dill|joblib|cloudpickle)\b": "pickle for data or weights",
    r"trust_remote_code\s*=\s*True": "remote code must stay off unless the config sets it",
    r"use_safetensors\s*=\s*False|safe_serialization\s*=\s*False": "weights must be safetensors",
    r"\.listen\(|\.bind\(|socketserver|http\.server|start_server\(|create_server\(": "nothing may listen",
}


def test_no_source_loads_pickle_runs_remote_code_or_listens():
    sources = sorted([*(ROOT / "rlhf").rglob("*.py"), *(ROOT / "app").rglob("*.py")])
    assert len(sources) > 20
    problems = [f"{path.relative_to(ROOT)}:{number}: {why}: {line.strip()}"
                for path in sources
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                for pattern, why in FORBIDDEN.items() if re.search(pattern, line)]
    assert problems == []


def test_the_forbidden_patterns_catch_what_they_name():
    caught = {line: [why for pattern, why in FORBIDDEN.items() if re.search(pattern, line)] for line in (
        "state = torch.load(path)", "state = torch.load(path, weights_only=True)", "import pickle",
        "model = AutoModel.from_pretrained(name, trust_remote_code=True)", "sock.listen(5)",
        "model.save_pretrained(out, safe_serialization=False)")}
    assert [line for line, whys in caught.items() if not whys] == ["state = torch.load(path, weights_only=True)"]


def test_every_file_a_reward_and_ppo_run_write_is_free_of_pickle(rewarded):
    ws, reward_run = rewarded
    result = run_ppo(ws, ws.load_config().override({"ppo.steps": 2}), reward_run=reward_run)
    assert result.status == "finished", result.message
    files = [p for p in ws.runs_dir.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.name for p in weights} >= {"adapter_model.safetensors", "score_head.safetensors",
                                        "value_head.safetensors", "optimizer.safetensors", "rng.safetensors"}
    for path in files:
        head = path.read_bytes()[:4]
        assert not head.startswith(PICKLE_MAGIC) and head != ZIP_MAGIC, path
        assert path.suffix in (".safetensors", ".json", ".md"), path
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            assert list(f.keys()), path
