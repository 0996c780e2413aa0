"""The `rlhf-tui` command line: --help everywhere, plain scriptable output, one-line errors with exit 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rlhf import cli
from rlhf.config import Config, describe_defaults
from rlhf.store import Store
from rlhf_tui.app import cli as console


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


def _prompts_file(tmp_path: Path, lines: str = "Write a haiku\nName a river\nWrite a haiku\n") -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(lines, encoding="utf-8")
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    code, out, err = result
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("rlhf-tui: error: "), err
    for fragment in fragments:
        assert fragment in err


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand, found in the parser itself so commands added later are covered."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, (*prefix, name))
    return paths


def test_every_command_has_help(capsys):
    # The console script's parser: rlhf.cli's commands plus the app.
    paths = _command_paths(console.build_parser())
    assert {("app",), ("prompts", "import"), ("prompts", "list"), ("export",), ("import-pairs",), ("stats",),
            ("config",)} <= set(paths)
    assert set(_command_paths(cli.build_parser())) == set(paths) - {("app",)}
    for path in paths:
        code = console.main([*path, "--help"])
        out, err = capsys.readouterr()
        assert (code, err) == (0, ""), path
        assert out.startswith(f"usage: rlhf-tui {' '.join(path)}".rstrip()), path
        if path and path != ("prompts",):
            assert "--workspace DIR" in out, path


def test_module_entry_point_prints_help_and_one_line_errors(tmp_path: Path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)

    helped = run("--help")
    assert helped.returncode == 0 and "prompts" in helped.stdout and "import-pairs" in helped.stdout
    failed = run("--workspace", str(tmp_path / "missing"), "stats")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr == f"rlhf-tui: error: {tmp_path / 'missing'}: workspace directory does not exist " \
                            "(create it, or pass --workspace DIR)\n"


def test_cli_module_does_not_import_torch():
    probe = "import sys, rlhf.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120).stdout.strip() == "False"


def test_prompts_import_and_list(capsys, tmp_path: Path, ws: Path):
    path = _prompts_file(tmp_path)
    assert _run(capsys, "prompts", "import", path, "--workspace", ws, "--tag", "batch1") == \
        (0, "imported 2 prompts (1 duplicate skipped)\n", "")
    assert _run(capsys, "--workspace", ws, "prompts", "import", path) == \
        (0, "imported 0 prompts (3 duplicates skipped)\n", "")
    code, out, _ = _run(capsys, "prompts", "--workspace", ws, "list")
    assert (code, out) == (0, "1\tbatch1\tWrite a haiku\n2\tbatch1\tName a river\n")
    code, out, _ = _run(capsys, "prompts", "list", "--json", "--tag", "batch1", "--workspace", ws)
    assert [p["text"] for p in json.loads(out)] == ["Write a haiku", "Name a river"]
    assert _run(capsys, "prompts", "list", "--tag", "other", "--workspace", ws) == (0, "", "")


def test_workspace_defaults_to_the_current_directory(capsys, tmp_path: Path, ws: Path, monkeypatch):
    monkeypatch.chdir(ws)
    assert _run(capsys, "prompts", "import", _prompts_file(tmp_path))[0] == 0
    assert (ws / "rlhf.db").is_file()


def test_bad_prompt_file_is_one_line_and_imports_nothing(capsys, tmp_path: Path, ws: Path):
    path = _prompts_file(tmp_path, "one\n\nthree\n")
    _assert_one_line_error(_run(capsys, "prompts", "import", path, "--workspace", ws), f"{path}:2: empty prompt")
    with Store(ws / "rlhf.db") as store:
        assert store.prompts() == []


def test_stats_plain_and_json(capsys, tmp_path: Path, ws: Path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                     '{"prompt": "q", "chosen": "c", "rejected": "d", "tie": true}\n', encoding="utf-8")
    assert _run(capsys, "import-pairs", pairs, "--workspace", ws) == \
        (0, "imported 2 pairs (1 new prompt, 0 already present; 0 duplicates skipped)\n", "")
    code, out, _ = _run(capsys, "stats", "--workspace", ws)
    assert (code, out) == (0, "prompts: 1\nresponses: 4\n"
                              "comparisons: 2 (a 1, b 0, tie 1, both_bad 0, skip 0)\nruns: none\n")
    code, out, _ = _run(capsys, "stats", "--json", "--workspace", ws)
    assert json.loads(out)["by_choice"]["tie"] == 1


def test_export_and_import_pairs_round_trip(capsys, tmp_path: Path, ws: Path):
    source = tmp_path / "pairs.jsonl"
    source.write_text('{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.0}\n', encoding="utf-8")
    assert _run(capsys, "--workspace", ws, "import-pairs", source)[0] == 0
    out = tmp_path / "out.jsonl"
    assert _run(capsys, "export", out, "--workspace", ws) == (0, f"exported 1 pair to {out}\n", "")
    assert out.read_text(encoding="utf-8") == source.read_text(encoding="utf-8")
    code, _, _ = _run(capsys, "export", "--format", "messages", out, "--workspace", ws)
    assert code == 0 and json.loads(out.read_text(encoding="utf-8"))["prompt"] == [{"role": "user", "content": "2+2?"}]


def test_read_only_commands_do_not_create_a_database(capsys, ws: Path):
    for argv in (["stats"], ["prompts", "list"], ["export", ws / "out.jsonl"]):
        _assert_one_line_error(_run(capsys, *argv, "--workspace", ws), "no rlhf.db here yet")
    assert list(ws.iterdir()) == []


@pytest.mark.parametrize("toml, fragment", [
    ("[model]\nnme = 'x'\n", "unknown key 'model.nme'"),
    ("[ppo]\nlr = -1.0\n", "ppo.lr must be > 0.0, got -1.0"),
    ("[ppo]\nkeep_checkpoints = 0\n", "ppo.keep_checkpoints must be >= 1, got 0"),
    ("[nope]\n", "unknown section [nope]"),
    ("[model\n", "not valid TOML"),
])
def test_bad_config_names_the_key(capsys, tmp_path: Path, ws: Path, toml: str, fragment: str):
    (ws / "rlhf.toml").write_text(toml, encoding="utf-8")
    _assert_one_line_error(_run(capsys, "prompts", "import", _prompts_file(tmp_path), "--workspace", ws), fragment)


def test_user_errors_are_one_line(capsys, tmp_path: Path, ws: Path):
    (ws / "rlhf.db").write_text("not a database\n" * 100, encoding="utf-8")
    _assert_one_line_error(_run(capsys, "stats", "--workspace", ws), "not a SQLite database")
    _assert_one_line_error(_run(capsys, "prompts", "import", tmp_path / "nope.txt", "--workspace", tmp_path),
                           "nope.txt: no such file")
    _assert_one_line_error(_run(capsys, "import-pairs", _prompts_file(tmp_path), "--workspace", tmp_path),
                           "unknown extension '.txt' for preference pairs")
    assert not (tmp_path / "rlhf.db").exists()  # the failed imports created no database
    Store(tmp_path / "rlhf.db").close()
    _assert_one_line_error(_run(capsys, "export", tmp_path / "no" / "out.jsonl", "--workspace", tmp_path),
                           "directory does not exist")


def test_usage_errors_exit_2(capsys, ws: Path):
    for argv in (["frobnicate"], ["prompts"], ["export", "--format", "csv", "out.jsonl"], ["stats", "--bogus"]):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == "" and "rlhf-tui" in err and "Traceback" not in err, argv


def test_config_prints_documented_defaults_and_the_effective_config(capsys, ws: Path):
    assert _run(capsys, "config") == (0, describe_defaults(), "")
    (ws / "rlhf.toml").write_text("[ppo]\nsteps = 7\n", encoding="utf-8")
    code, out, _ = _run(capsys, "config", "--show", "--model", "org/model", "--workspace", ws)
    (ws / "shown.toml").write_text(out, encoding="utf-8")
    shown = Config.load(ws / "shown.toml")
    assert code == 0 and (shown.ppo.steps, shown.model.name) == (7, "org/model")
    assert shown.to_dict() == Config.load(ws / "rlhf.toml").override({"model.name": "org/model"}).to_dict()


def test_app_imports_prompts_first_and_gets_overrides(capsys, tmp_path: Path, ws: Path, monkeypatch):
    seen = {}

    def run_app(workspace, config, annotator=None):
        with Store(workspace.db_path) as store:
            seen.update(root=workspace.root, model=config.model.name, annotator=annotator,
                        prompts=len(store.prompts()))
        return 0

    # Stands in for the Textual app, which has its own tests; here only the wiring is checked.
    monkeypatch.setitem(sys.modules, "rlhf_tui.app.main", types.SimpleNamespace(run_app=run_app))
    assert console.main(["--workspace", str(ws), "--model", "org/m", "--annotator", "ann",
                         "--prompts", str(_prompts_file(tmp_path))]) == 0
    assert capsys.readouterr().out == "imported 2 prompts (1 duplicate skipped)\n"
    assert seen == {"root": ws.resolve(), "model": "org/m", "annotator": "ann", "prompts": 2}
    # `app` is the same command, its options accepted after the name too.
    assert console.main(["app", "--workspace", str(ws), "--annotator", "other"]) == 0
    assert seen["annotator"] == "other" and seen["prompts"] == 2


def test_the_headless_cli_alone_names_the_missing_command(capsys):
    _assert_one_line_error(_run(capsys), "name a command (see --help); `rlhf-tui` with no command opens the app")
    code, out, err = _run(capsys, "--prompts=p.txt")  # an app option: the core parser does not know it
    assert code == 2 and out == "" and "unrecognized arguments: --prompts=p.txt" in err


def test_keyboard_interrupt_exits_130(capsys, tmp_path: Path, ws: Path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.data, "import_prompts", interrupted)
    assert _run(capsys, "prompts", "import", _prompts_file(tmp_path), "--workspace", ws) == \
        (130, "", "rlhf-tui: interrupted\n")
