"""Bad input, second pass (issue 11 items 7-10), through the real `rlhf-tui` command (that pass's bad files and
settings joined the tables of test_fault_input.py): a damaged model or run folder, or what used to give a
misleading message, is one line naming the thing and the fix, and writes nothing; data that used to import
wrongly (doubled, identical answers, one prompt for a CR-only file) imports right; text from the database
reaches the terminal escaped."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fault_kit import StopAfter, assert_one_line_error, make_labeled_workspace, rlhf_tui, tree_snapshot
from rlhf import cli
from rlhf.checkpoints import CHECKPOINTS_DIR
from rlhf.config import SECTIONS, Workspace
from rlhf.data_io import TERMINAL_CONTROLS
from rlhf.errors import StoreError
from rlhf.store import Store


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
    hostile = "Clear\x1b[2J\x1b]0;pwned\x07 me\u202eevil\rover\nnext\x9b2J"  # \x9b: CSI in one byte (C1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": hostile, "tags": ["t\x1b[31m"]}) + "\n", encoding="utf-8")
    assert rlhf_tui("--workspace", tmp_path / "ws", "prompts", "import", prompts).returncode == 0
    done = rlhf_tui("--workspace", tmp_path / "ws", "prompts", "list")
    assert done.stdout == ("1\tt\\x1b[31m\tClear\\x1b[2J\\x1b]0;pwned\\x07 me\\u202eevil\\rover\\nnext\\x9b2J\n")
    as_json = rlhf_tui("--workspace", tmp_path / "ws", "prompts", "list", "--json").stdout
    assert not TERMINAL_CONTROLS.search(as_json.replace("\n", ""))  # its own line breaks aside
    assert json.loads(as_json)[0]["text"] == hostile


def test_every_int_setting_has_an_upper_bound():
    unbounded = [f"{name}.{f.name}" for name, section in SECTIONS.items() for f in dataclasses.fields(section)
                 if f.type in ("int", int) and f.metadata["hi"] is None]
    assert unbounded == []


# -- a damaged run folder given to --resume ------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


# (case, what is done to which file of runs/<id>/ (its checkpoint's files under "ckpt/"), the line's fragments)
DAMAGED_REWARD_RUNS = [
    ("truncated optimizer.safetensors", "ckpt/optimizer.safetensors", _truncate,
     "is damaged (optimizer.safetensors: Error while deserializing header: incomplete metadata, file not fully "
     "covered)"),
    ("truncated adapter weights", "ckpt/adapter/adapter_model.safetensors", _truncate,
     "is damaged (adapter/adapter_model.safetensors: Error while deserializing header"),
    ("state.json not JSON", "ckpt/state.json", lambda p: p.write_text('{"step": 2,', encoding="utf-8"),
     "is damaged (state.json is not readable JSON: Expecting property name enclosed in double quotes"),
    ("state.json without its keys", "ckpt/state.json", lambda p: p.write_text("[]", encoding="utf-8"),
     "is damaged (state.json lacks optimizer_param_groups, python_rng, step, heldout_acc, seconds)"),
    ("python RNG state garbled", "ckpt/state.json",
     lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "python_rng": [3, [1, 2], None]})),
     "is damaged (state.json: python_rng is not a Python RNG state: state vector is the wrong size)"),
    ("no rng.safetensors", "ckpt/rng.safetensors", _delete, "is incomplete (rng.safetensors is missing)"),
    ("no adapter/", "ckpt/adapter", _delete, "is incomplete (adapter/adapter_config.json is missing)"),
    ("checkpoint folder gone", "ckpt", _delete, "is missing: it cannot resume"),
    ("pairs.json garbage", "pairs.json", lambda p: p.write_bytes(b"\x89PNG garbage"),
     "pairs.json: damaged, not the list of pairs rlhf-tui wrote ('utf-8' codec can't decode byte 0x89"),
    ("pairs.json of another shape", "pairs.json", lambda p: p.write_text('{"comparison_ids": [[1]]}'),
     "pairs.json: damaged, not the list of pairs rlhf-tui wrote (unexpected contents)"),
]


@pytest.fixture(scope="module")
def stopped_reward_template(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, str]:
    from rlhf.reward import train_reward

    ws = make_labeled_workspace(tmp_path_factory.mktemp("stopped") / "ws", tiny_model_dir)
    result = train_reward(ws, ws.load_config(), hooks=StopAfter(2))
    assert (result.status, result.step) == ("stopped", 2), result.message
    return ws.root, result.run_id


@pytest.mark.parametrize("case, target, damage, fragment", DAMAGED_REWARD_RUNS,
                         ids=[c[0] for c in DAMAGED_REWARD_RUNS])
def test_resume_from_a_damaged_reward_run_is_one_line_and_keeps_its_status(tmp_path, capsys, stopped_reward_template,
                                                                           case, target, damage, fragment):
    root = tmp_path / "ws"
    shutil.copytree(stopped_reward_template[0], root)
    run_id = stopped_reward_template[1]
    ws = Workspace(root)
    damage(ws.run_dir(run_id) / target.replace("ckpt", f"{CHECKPOINTS_DIR}/step-2"))
    with Store(ws.db_path) as store:
        before = store.run(run_id)
    files_before = tree_snapshot(ws.runs_dir)
    code = cli.main(["train-reward", "--workspace", str(root), "--resume", run_id])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, fragment, "train a new reward model with `rlhf-tui train-reward`")
    with Store(ws.db_path) as store:
        after = store.run(run_id)
    assert (after.status, after.error, after.checkpoint_step) == \
        (before.status, before.error, before.checkpoint_step) == ("stopped", None, 2)
    assert tree_snapshot(ws.runs_dir) == files_before


@pytest.mark.parametrize("target, damage, fragment", [
    ("value_head.safetensors", _truncate, "is damaged (value_head.safetensors: Error while deserializing header"),
    ("policy", _delete, "is incomplete (policy/adapter_config.json is missing)"),
], ids=["truncated value head", "no policy adapter"])
def test_resume_from_a_damaged_ppo_checkpoint_is_one_line_and_keeps_its_status(rewarded, capsys, target, damage,
                                                                                fragment):
    from rlhf.ppo import run_ppo

    ws, _ = rewarded
    result = run_ppo(ws, ws.load_config(), hooks=StopAfter(2))
    assert (result.status, result.step) == ("stopped", 2), result.message
    damage(ws.run_dir(result.run_id) / CHECKPOINTS_DIR / "step-2" / target)
    files_before = tree_snapshot(ws.runs_dir)
    code = cli.main(["ppo", "--workspace", str(ws.root), "--resume", result.run_id])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, fragment, "start a new run with `rlhf-tui ppo`")
    with Store(ws.db_path) as store:
        run = store.run(result.run_id)
    assert (run.status, run.error, run.checkpoint_step) == ("stopped", None, 2)
    assert tree_snapshot(ws.runs_dir) == files_before


# -- a damaged model folder ----------------------------------------------------------------------


def _edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        (folder / "config.json").write_text(json.dumps({**config, **changes}), encoding="utf-8")
    return edit


# (case, what is done to a copy of the tiny model, the file the line names (relative), what it must say)
DAMAGED_MODELS = [
    ("truncated model.safetensors", lambda d: _truncate(d / "model.safetensors"), "model.safetensors",
     "damaged or truncated (Error while deserializing header: incomplete metadata, file not fully covered); copy "
     "the model folder again"),
    ("no config.json", lambda d: (d / "config.json").unlink(), "",
     "no config.json, so this is not a model folder saved with save_pretrained"),
    ("tokenizer.json not JSON", lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json",
     "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); copy the model "
     "folder again"),
    ("tokenizer.json of another shape", lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}'),
     "", "cannot load its tokenizer (KeyError: 'added_tokens'); copy the tokenizer files of the model again"),
    ("hidden_size not the weights'", _edit_config(hidden_size=128), "",
     "the weights do not fit config.json (tensors of other shapes than its sizes, such as hidden_size, say): take "
     "config.json and the weights from the same model"),
    ("unknown model_type", _edit_config(model_type="llamazing"), "config.json",
     "model_type 'llamazing' is not one transformers"),
]


@pytest.mark.parametrize("case, damage, blamed, fragment", DAMAGED_MODELS, ids=[c[0] for c in DAMAGED_MODELS])
def test_damaged_model_folder_is_one_line_naming_the_file(labeled, tiny_model_dir, tmp_path, capsys, case, damage,
                                                          blamed, fragment):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    before = tree_snapshot(labeled.root)
    code = cli.main(["train-reward", "--workspace", str(labeled.root), "--model", str(model)])
    captured = capsys.readouterr()
    named = f"{model / blamed}: " if blamed else f"{model}: "
    assert_one_line_error(code, captured.err, f"rlhf-tui: error: {named}{fragment}")
    assert captured.out == "" and tree_snapshot(labeled.root) == before


def test_model_option_at_a_file_says_it_is_a_file(labeled, tmp_path, capsys):
    """It used to say "the hub is unreachable", which was never tried."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    before = tree_snapshot(labeled.root)
    code = cli.main(["train-reward", "--workspace", str(labeled.root), "--model", str(weights)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, f"cannot load model '{weights}': it is a file, not a model folder; pass "
                                              "the folder that holds config.json and the weights with --model "
                                              "/path/to/model")
    assert tree_snapshot(labeled.root) == before


# -- a runs/ folder that cannot be written -------------------------------------------------------


@contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """Writes into `folder` fail as they do for a user without permission (root ignores modes; the immutable flag
    binds root too)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _run_rows(ws: Workspace) -> list[dict]:
    with Store(ws.db_path) as store:
        return store.runs()


def test_train_reward_with_a_read_only_runs_folder_writes_nothing(labeled, capsys):
    labeled.runs_dir.mkdir()
    before = tree_snapshot(labeled.root)
    with _read_only(labeled.runs_dir):
        code = cli.main(["train-reward", "--workspace", str(labeled.root)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, f"{labeled.runs_dir}/reward-", ": cannot create the run's folder: ",
                          f"(check that {labeled.runs_dir} is writable and has room); nothing was written")
    assert _run_rows(labeled) == []  # it used to leave a failed run behind
    assert {k: v for k, v in tree_snapshot(labeled.root).items() if not k.startswith("rlhf.db")} == \
        {k: v for k, v in before.items() if not k.startswith("rlhf.db")}


def test_ppo_with_a_read_only_runs_folder_is_one_line(rewarded, capsys):
    ws, _ = rewarded
    rows_before = _run_rows(ws)
    with _read_only(ws.runs_dir):
        code = cli.main(["ppo", "--workspace", str(ws.root)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, f"{ws.runs_dir}: cannot write here (", "): make it writable (or free "
                          "some space); nothing was written")
    assert _run_rows(ws) == rows_before


def test_train_reward_on_a_full_disk_says_what_was_written_and_it_is_true(labeled, capsys, monkeypatch):
    """The first write of a new reward run is its pairs.json: the disk is full there. It used to leave a run row
    (and, when the store's write failed too, say "nothing was written")."""
    real_write_text = Path.write_text

    def full_for_pairs_json(self, *args, **kwargs):
        if self.name == "pairs.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    before = tree_snapshot(labeled.root)
    monkeypatch.setattr(Path, "write_text", full_for_pairs_json)
    code = cli.main(["train-reward", "--workspace", str(labeled.root)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, ": cannot create the run's folder: disk full (free some space) (check "
                          f"that {labeled.runs_dir} is writable and has room); nothing was written")
    assert _run_rows(labeled) == []
    assert not labeled.runs_dir.exists()
    assert {k: v for k, v in tree_snapshot(labeled.root).items() if not k.startswith("rlhf.db")} == \
        {k: v for k, v in before.items() if not k.startswith("rlhf.db")}


def test_reward_run_row_that_cannot_be_written_leaves_no_folder(labeled, capsys, monkeypatch):
    """The other order of the same fault: pairs.json is written, then the database is full."""
    def database_full(self, *args, **kwargs):
        raise StoreError(f"{labeled.db_path}: write: disk is full (free some space; this write was not saved)")

    monkeypatch.setattr(Store, "create_run", database_full)
    code = cli.main(["train-reward", "--workspace", str(labeled.root)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, "rlhf.db: write: disk is full (free some space; this write was not "
                                              "saved)")
    assert not labeled.runs_dir.exists()
