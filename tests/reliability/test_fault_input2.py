"""Bad input, second pass (issue 11 items 7-10), through the real `rlhf-tui` command: input that used to end in
a traceback (and an empty rlhf.db) or a misleading message is one line naming the thing and the fix, and writes
nothing; data that used to import wrongly (doubled, identical answers, one prompt for a CR-only file) imports
right; text from the database reaches the terminal escaped."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fault_kit import assert_one_line_error, rlhf_tui, tree_snapshot
from rlhf.config import SECTIONS
from rlhf.store import PromptItem, Store

PAIR = '{"prompt": "q", "chosen": "a", "rejected": "b"'

# (case, file name, its bytes, command before the file, what the one line must say)
BAD_FILES = [
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
def test_bad_file_is_one_line_and_creates_no_database(tmp_path: Path, case, name, content, command, fragments):
    ws = tmp_path / "ws"
    ws.mkdir()
    bad = tmp_path / name
    bad.write_bytes(content)
    done = rlhf_tui("--workspace", ws, *command, bad)
    assert_one_line_error(done.returncode, done.stderr, *fragments)
    assert list(ws.iterdir()) == []


def _prompts_listed(ws: Path) -> list[str]:
    done = rlhf_tui("--workspace", ws, "prompts", "list")
    assert done.returncode == 0, done.stderr
    return [line.split("\t")[2] for line in done.stdout.splitlines()]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_utf16_and_utf8_bom_files_import(tmp_path: Path, encoding: str):
    """Windows Notepad's "Unicode" and PowerShell's `>` write UTF-16 with a byte order mark: it used to be
    refused as a "binary file"."""
    (tmp_path / "ws").mkdir()
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("Name a river\r\nÉcris un haïku\r\n".encode(encoding))
    done = rlhf_tui("--workspace", tmp_path / "ws", "prompts", "import", prompts)
    assert (done.returncode, done.stdout, done.stderr) == (0, "imported 2 prompts (0 duplicates skipped)\n", "")
    assert _prompts_listed(tmp_path / "ws") == ["Name a river", "Écris un haïku"]


def test_cr_only_file_imports_one_prompt_per_line(tmp_path: Path):
    (tmp_path / "ws").mkdir()
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"Name a river\rWrite a haiku\rCount to three\r")  # classic Mac OS line endings
    done = rlhf_tui("--workspace", tmp_path / "ws", "prompts", "import", prompts)
    assert done.stdout == "imported 3 prompts (0 duplicates skipped)\n", done.stderr
    assert _prompts_listed(tmp_path / "ws") == ["Name a river", "Write a haiku", "Count to three"]


def test_importing_pairs_twice_or_an_export_adds_nothing(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "c", "rejected": "d"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},
    ]), encoding="utf-8")
    first = rlhf_tui("--workspace", ws, "import-pairs", pairs)
    assert (first.returncode, first.stdout) == (0, "imported 2 pairs (1 new prompt, 0 already present; "
                                                   "0 duplicates skipped, 1 skipped as chosen == rejected)\n")
    again = rlhf_tui("--workspace", ws, "import-pairs", pairs)
    assert again.stdout == ("imported 0 pairs (0 new prompts, 0 already present; 2 duplicates skipped, "
                            "1 skipped as chosen == rejected)\n")
    exported = tmp_path / "out.jsonl"
    assert rlhf_tui("--workspace", ws, "export", exported).returncode == 0
    before = tree_snapshot(ws)
    round_trip = rlhf_tui("--workspace", ws, "import-pairs", exported)
    assert round_trip.stdout == "imported 0 pairs (0 new prompts, 0 already present; 2 duplicates skipped)\n"
    stats = rlhf_tui("--workspace", ws, "stats").stdout
    assert "comparisons: 2 (a 2," in stats, stats
    assert {k: v for k, v in tree_snapshot(ws).items() if not k.startswith("rlhf.db")} == \
        {k: v for k, v in before.items() if not k.startswith("rlhf.db")}


def test_prompts_list_escapes_terminal_control_sequences(tmp_path: Path):
    (tmp_path / "ws").mkdir()
    hostile = "Clear\x1b[2J\x1b]0;pwned\x07 me\u202eevil\rover\nnext"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": hostile, "tags": ["t\x1b[31m"]}) + "\n", encoding="utf-8")
    assert rlhf_tui("--workspace", tmp_path / "ws", "prompts", "import", prompts).returncode == 0
    done = rlhf_tui("--workspace", tmp_path / "ws", "prompts", "list")
    assert done.stdout == ("1\tt\\x1b[31m\tClear\\x1b[2J\\x1b]0;pwned\\x07 me\\u202eevil\\rover\\nnext\n")


def _workspace_with_a_prompt(root: Path, toml: str) -> Path:
    root.mkdir()
    (root / "rlhf.toml").write_text(toml, encoding="utf-8")
    with Store(root / "rlhf.db") as store:
        store.add_prompts([PromptItem("already here")], source="test")
    return root


# (case, rlhf.toml, command, what the one line must say); each used to start and die (a traceback, or the kernel).
HUGE_SETTINGS = [
    ("20-digit ppo.steps", "[ppo]\nsteps = 99999999999999999999\n", ("ppo",),
     ["rlhf.toml: ppo.steps must be <= 1000000, got 99999999999999999999"]),
    ("ppo.batch_size 100000", "[ppo]\nbatch_size = 100000\n", ("ppo",),
     ["rlhf.toml: ppo.batch_size must be <= 1024, got 100000"]),
    ("--steps 1e20", "", ("ppo", "--steps", "100000000000000000000"),
     ["option: ppo.steps must be <= 1000000, got 100000000000000000000"]),
    ("20-digit reward.epochs", "[reward]\nepochs = 99999999999999999999\n", ("train-reward",),
     ["rlhf.toml: reward.epochs must be <= 1000, got 99999999999999999999"]),
]


@pytest.mark.parametrize("case, toml, command, fragments", HUGE_SETTINGS, ids=[c[0] for c in HUGE_SETTINGS])
def test_huge_setting_is_refused_with_its_key(tmp_path: Path, case, toml, command, fragments):
    ws = _workspace_with_a_prompt(tmp_path / "ws", toml)
    before = tree_snapshot(ws)
    done = rlhf_tui("--workspace", ws, *command)
    assert_one_line_error(done.returncode, done.stderr, *fragments)
    assert tree_snapshot(ws) == before


def test_every_int_setting_has_an_upper_bound():
    unbounded = [f"{name}.{f.name}" for name, section in SECTIONS.items() for f in dataclasses.fields(section)
                 if f.type in ("int", int) and f.metadata["hi"] is None]
    assert unbounded == []
