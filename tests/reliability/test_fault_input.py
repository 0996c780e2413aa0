"""Bad input to the real `rlhf-tui` command: each is one `rlhf-tui: error:` line naming the thing and the fix,
a non-zero exit, no traceback, and nothing written (the workspace's files are byte for byte the same, and a
fresh workspace gets no rlhf.db).

Covered elsewhere, not repeated here: a file that is not SQLite and an unknown config key (tests/test_cli.py,
test_user_errors_are_one_line / test_bad_config_names_the_key), a read-only database (tests/test_store.py,
as an unprivileged process), too few pairs for reward training (tests/test_reward.py,
test_cli_train_reward_too_few_pairs_is_one_line, test_too_few_pairs_says_how_many_more).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fault_kit import assert_one_line_error, rlhf_tui, tree_snapshot
from rlhf import cli
from rlhf.store import DEFAULT_BUSY_TIMEOUT_S, SCHEMA_VERSION, PromptItem, Store

GOOD_PROMPTS = "Name a river\nWrite a haiku\n"
PAIR = '{"prompt": "q", "chosen": "a", "rejected": "b"'

# (case, input file name, its bytes, command before the file, what the one line must say)
BAD_FILES = [
    ("empty prompts file", "p.txt", b"\n \n", ("prompts", "import"), ["p.txt: empty file, no prompts to import"]),
    ("binary prompts file", "p.txt", b"hello\n\x00\x01\x02", ("prompts", "import"),
     ["p.txt:2: binary file (NUL byte at offset 6); expected UTF-8 text"]),
    ("prompts file not UTF-8", "p.txt", "ok\ncaf\xe9\n".encode("latin-1"), ("prompts", "import"),
     ["p.txt:2: not UTF-8 (byte 0xe9 at offset 6); save the file as UTF-8"]),
    ("malformed JSONL, line 2", "p.jsonl", b'{"prompt": "fine"}\n{"prompt": "broken",}\n', ("prompts", "import"),
     ["p.jsonl:2: invalid JSON"]),
    ("CSV without a prompt column", "p.csv", b"question,tags\nWhy?,x\n", ("prompts", "import"),
     ["p.csv:1: no 'prompt' column (columns found: question, tags)"]),
    ("pairs file missing a key", "p.jsonl", b'{"prompt": "q", "chosen": "a"}\n', ("import-pairs",),
     ["p.jsonl:1: missing 'rejected'"]),
    ("bad prompts file given to the app", "p.txt", b"", ("--prompts",), ["p.txt: empty file"]),
    # issue 11, second pass: each of these ended in a traceback (and an empty rlhf.db)
    ("JSONL line nested 100k deep", "p.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     ("import-pairs",), ["p.jsonl:1: JSON nested too deeply", "fix the line"]),
    ("lone surrogate escape", "p.jsonl", b'{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}\n', ("import-pairs",),
     ["p.jsonl:1: a lone UTF-16 surrogate \\ud800 in a string (half of an escaped character pair; not text)"]),
    ("lone surrogate in a prompt file", "p.jsonl", b'{"prompt": "q\\udfff"}\n', ("prompts", "import"),
     ["p.jsonl:1: a lone UTF-16 surrogate \\udfff"]),
    ("400-digit margin", "p.jsonl", (PAIR + ', "margin": 1' + "0" * 400 + "}\n").encode(), ("import-pairs",),
     ["p.jsonl:1: 'margin' must be a number from -100 to 100 (a reward difference; datasets use 0 to about 10), "
      "got 10000000000000000000..."]),
    ("margin 1e308", "p.jsonl", (PAIR + ', "margin": 1e308}\n').encode(), ("import-pairs",),
     ["p.jsonl:1: 'margin' must be a number from -100 to 100", "got 1e+308"]),
]


@pytest.mark.parametrize("case, name, content, command, fragments", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_file_into_a_fresh_workspace_creates_nothing(tmp_path: Path, case, name, content, command, fragments):
    ws = tmp_path / "ws"
    ws.mkdir()
    bad = tmp_path / name
    bad.write_bytes(content)
    done = rlhf_tui("--workspace", ws, *command, bad)
    assert_one_line_error(done.returncode, done.stderr, *fragments)
    assert list(ws.iterdir()) == []  # no rlhf.db left behind by a command that failed


def _workspace_with_prompts(root: Path, toml: str = "") -> Path:
    root.mkdir()
    (root / "rlhf.toml").write_text(toml, encoding="utf-8")
    with Store(root / "rlhf.db") as store:
        store.add_prompts([PromptItem("already here")], source="test")
    return root


# (case, rlhf.toml, command, what the one line must say); every command would write if it ran.
BAD_SETTINGS = [
    ("temperature 0", "[sampling]\ntemperature = 0.0\n", ("prompts", "import", "{prompts}"),
     ["sampling.temperature must be > 0.0, got 0.0"]),
    ("rollout temperature below 0", "[ppo]\ntemperature = -1.0\n", ("prompts", "import", "{prompts}"),
     ["ppo.temperature must be > 0.0, got -1.0"]),
    ("top-p 0", "[sampling]\ntop_p = 0.0\n", ("prompts", "import", "{prompts}"), ["sampling.top_p must be > 0.0"]),
    ("top-p above 1", "[sampling]\ntop_p = 1.5\n", ("prompts", "import", "{prompts}"),
     ["sampling.top_p must be <= 1.0, got 1.5"]),
    ("batch size 0 in rlhf.toml", "[ppo]\nbatch_size = 0\n", ("ppo",), ["ppo.batch_size must be >= 1, got 0"]),
    ("PPO --batch-size 0", "", ("ppo", "--batch-size", "0"), ["option: ppo.batch_size must be >= 1, got 0"]),
    ("train-reward --batch-size 0", "", ("train-reward", "--batch-size", "0"),
     ["option: reward.batch_size must be >= 1, got 0"]),
    ("a value of the wrong type", '[reward]\nepochs = "three"\n', ("train-reward",),
     ["reward.epochs must be int, got 'three'"]),
    ("20-digit ppo.steps", "[ppo]\nsteps = 99999999999999999999\n", ("ppo",),
     ["rlhf.toml: ppo.steps must be <= 1000000, got 99999999999999999999"]),
    ("ppo.batch_size 100000", "[ppo]\nbatch_size = 100000\n", ("ppo",),
     ["rlhf.toml: ppo.batch_size must be <= 1024, got 100000"]),
    ("--steps 1e20", "", ("ppo", "--steps", "100000000000000000000"),
     ["option: ppo.steps must be <= 1000000, got 100000000000000000000"]),
    ("20-digit reward.epochs", "[reward]\nepochs = 99999999999999999999\n", ("train-reward",),
     ["rlhf.toml: reward.epochs must be <= 1000, got 99999999999999999999"]),
]


@pytest.mark.parametrize("case, toml, command, fragments", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_out_of_range_setting_names_the_key_and_writes_nothing(tmp_path: Path, case, toml, command, fragments):
    ws = _workspace_with_prompts(tmp_path / "ws", toml)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(GOOD_PROMPTS, encoding="utf-8")
    before = tree_snapshot(ws)
    done = rlhf_tui("--workspace", ws, *(arg.format(prompts=prompts) for arg in command))
    assert_one_line_error(done.returncode, done.stderr, *fragments)
    assert tree_snapshot(ws) == before


def test_database_from_a_newer_rlhf_tui_is_refused_untouched(tmp_path: Path):
    ws = _workspace_with_prompts(tmp_path / "ws")
    with sqlite3.connect(ws / "rlhf.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(GOOD_PROMPTS, encoding="utf-8")
    before = tree_snapshot(ws)
    done = rlhf_tui("--workspace", ws, "prompts", "import", prompts)
    assert_one_line_error(done.returncode, done.stderr, f"database schema v{SCHEMA_VERSION + 1} is newer than this "
                                                        f"rlhf-tui (v{SCHEMA_VERSION}); upgrade rlhf-tui")
    assert tree_snapshot(ws) == before


HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO prompts (key, text, created_at) VALUES ('k', 'uncommitted', 'now')")
print("holding", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def test_database_locked_past_the_timeout_says_so_and_writes_nothing(tmp_path: Path):
    ws = _workspace_with_prompts(tmp_path / "ws")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(GOOD_PROMPTS, encoding="utf-8")
    before = tree_snapshot(ws)
    # Another process (its own: POSIX locks are per process) holds the write lock for longer than the timeout.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(ws / "rlhf.db")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        done = rlhf_tui("--workspace", ws, "prompts", "import", prompts)
    finally:
        holder.stdin.close()
        holder.wait(60)
    assert_one_line_error(done.returncode, done.stderr, "database is locked by another process for more than "
                          f"{DEFAULT_BUSY_TIMEOUT_S:g}s (close the other writer and retry)")
    assert tree_snapshot(ws) == before


def test_ppo_without_a_reward_run_is_one_line_even_with_the_ml_stack_loaded(labeled):
    """One command that imports torch, transformers and peft: their import-time chatter must not reach stderr."""
    before = tree_snapshot(labeled.root)
    done = rlhf_tui("--workspace", labeled.root, "ppo")
    assert_one_line_error(done.returncode, done.stderr, "no finished reward run: train one with "
                                                        "`rlhf-tui train-reward`")
    assert done.stdout == ""
    assert tree_snapshot(labeled.root) == before


def _without_tokenizer(model_dir: Path, out: Path) -> Path:
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    return out


@pytest.mark.parametrize("case", ["no such model path", "model folder without a tokenizer"])
def test_unloadable_model_is_one_line_and_writes_nothing(labeled, tiny_model_dir, tmp_path, capsys, case):
    """In this process (the ML stack is already imported): the command line is the same `main` as above."""
    if case == "no such model path":
        model, fragments = tmp_path / "no" / "model", ["not a local directory", "--model /path/to/model"]
    else:
        model = _without_tokenizer(tiny_model_dir, tmp_path / "no-tokenizer")
        fragments = [f"{model}: no tokenizer files", "save the tokenizer next to the model"]
    before = tree_snapshot(labeled.root)
    code = cli.main(["train-reward", "--workspace", str(labeled.root), "--model", str(model)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, *fragments)
    assert captured.out == "" and tree_snapshot(labeled.root) == before
