"""The `rlhf-tui` command: opens the app, or runs one headless command on a workspace.

Adding a command: write `_cmd_<name>(args) -> int` and `_register_<name>(commands)`, then append the
register function to `COMMANDS`. `_add_command` gives every subcommand `--workspace` (accepted before
or after the command name); `_add_model_option` adds `--model` to commands that load a model;
`load_config` / `open_workspace` give the workspace, its config with CLI overrides applied, and its
store. User errors are `RlhfError`s: `main` prints them on one line and returns exit code 2.
Heavy modules (torch) are imported inside the commands that need them, never here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, Workspace, describe_defaults
from .data_io import EXPORT_FORMATS, export_pairs, import_pairs, import_prompts
from .errors import RlhfError
from .store import Store

PROG = "rlhf-tui"


@dataclass
class Session:
    workspace: Workspace
    config: Config
    store: Store


def load_config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> tuple[Workspace, Config]:
    """The --workspace directory and its rlhf.toml, with --model and `overrides` (`section.key`: value) applied.

    Overrides whose value is None (flags not given) leave the file's value alone.
    """
    workspace = Workspace(getattr(args, "workspace", None) or Path.cwd())
    if not workspace.root.is_dir():
        raise RlhfError(f"{workspace.root}: workspace directory does not exist (create it, or pass --workspace DIR)")
    overrides = {"model.name": getattr(args, "model", None), **(overrides or {})}
    return workspace, workspace.load_config().override(overrides)


@contextmanager
def open_workspace(args: argparse.Namespace, overrides: dict[str, Any] | None = None, *,
                   create: bool = False) -> Iterator[Session]:
    """`load_config` plus the workspace store, closed afterwards.

    Without `create`, a workspace that has no rlhf.db yet is an error rather than a new empty database:
    read-only commands run in the wrong directory should say so, not leave a database behind.
    """
    workspace, config = load_config(args, overrides)
    if not create and not workspace.db_path.exists():
        raise RlhfError(f"{workspace.root}: no {workspace.db_path.name} here yet "
                        "(import prompts with `rlhf-tui prompts import FILE`, or pass --workspace DIR)")
    with Store(workspace.db_path) as store:
        yield Session(workspace, config, store)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


# -- commands --------------------------------------------------------------------------------


def _import_prompts(store: Store, path: Path, tags: list[str]) -> str:
    imported, duplicates = import_prompts(store, path, tags)
    return f"imported {_plural(imported, 'prompt')} ({_plural(duplicates, 'duplicate')} skipped)"


def _cmd_app(args: argparse.Namespace) -> int:
    workspace, config = load_config(args)
    if args.prompts:
        with Store(workspace.db_path) as store:
            print(_import_prompts(store, args.prompts, []))
    try:
        from app.main import run_app
    except ModuleNotFoundError as exc:
        raise RlhfError(f"cannot start the app: module {exc.name!r} is missing (reinstall rlhf-tui)") from None
    return run_app(workspace, config, annotator=args.annotator) or 0


def _cmd_prompts_import(args: argparse.Namespace) -> int:
    with open_workspace(args, create=True) as session:
        print(_import_prompts(session.store, args.file, args.tag))
    return 0


def _cmd_prompts_list(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        prompts = session.store.prompts(tag=args.tag)
    if args.json:
        _print_json(prompts)
    else:
        for p in prompts:
            one_line = p["text"].replace("\n", "\\n")
            print(f"{p['id']}\t{','.join(p['tags'])}\t{one_line}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        count = export_pairs(session.store, args.out, fmt=args.format, include_ties=args.include_ties)
    print(f"exported {_plural(count, 'pair')} to {args.out}")
    return 0


def _cmd_import_pairs(args: argparse.Namespace) -> int:
    with open_workspace(args, create=True) as session:
        summary = import_pairs(session.store, args.file)
    print(f"imported {_plural(summary.pairs, 'pair')} "
          f"({_plural(summary.new_prompts, 'new prompt')}, {summary.known_prompts} already present)")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        stats = session.store.stats()
    if args.json:
        _print_json(stats)
        return 0
    by_choice = ", ".join(f"{choice} {n}" for choice, n in stats["by_choice"].items())
    runs = ", ".join(f"{kind_status} {n}" for kind_status, n in stats["runs"].items()) or "none"
    print(f"prompts: {stats['prompts']}")
    print(f"responses: {stats['responses']}")
    print(f"comparisons: {stats['comparisons']} ({by_choice})")
    print(f"runs: {runs}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.show:
        print(load_config(args)[1].to_toml(), end="")
    else:
        print(describe_defaults(), end="")
    return 0


# -- parser ----------------------------------------------------------------------------------


def _workspace_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand that does not see the flag must not reset the value given before it.
    parser.add_argument("--workspace", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                        help="workspace directory holding rlhf.toml, rlhf.db and runs/ (default: current directory)")


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=argparse.SUPPRESS, metavar="ID_OR_PATH",
                        help="hub id or local path of the base model (default: model.name in rlhf.toml)")


def _add_command(commands: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
                 summary: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=summary, description=summary)
    _workspace_option(parser)
    parser.set_defaults(handler=handler)
    return parser


def _register_prompts(commands: argparse._SubParsersAction) -> None:
    prompts = commands.add_parser("prompts", help="import or list prompts", description="Import or list prompts.")
    _workspace_option(prompts)
    actions = prompts.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = _add_command(actions, "import", _cmd_prompts_import,
                       "import prompts from .txt (one per line), .jsonl (prompt or chat messages) or .csv "
                       "(prompt column); duplicates are skipped, a bad line imports nothing")
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--tag", action="append", default=[], metavar="T",
                     help="add this tag to every new prompt (repeatable)")
    lst = _add_command(actions, "list", _cmd_prompts_list, "list prompts: id, tags, text")
    lst.add_argument("--tag", metavar="T", help="only prompts with this tag")
    lst.add_argument("--json", action="store_true", help="print a JSON array with every field")


def _register_export(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(commands, "export", _cmd_export,
                          "write labeled pairs as JSONL (ties only with --include-ties; both_bad and skip never)")
    parser.add_argument("out", type=Path, metavar="OUT.jsonl")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="trl",
                        help="trl: prompt/chosen/rejected strings; messages: the same as chat messages; "
                             "openai: preference fine-tuning (default: trl)")
    parser.add_argument("--include-ties", action="store_true", help="also write ties, marked \"tie\": true")


def _register_import_pairs(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(commands, "import-pairs", _cmd_import_pairs,
                          "import preference pairs (trl JSONL: prompt, chosen, rejected, optional margin) "
                          "as comparisons; a bad line imports nothing")
    parser.add_argument("file", type=Path, metavar="FILE.jsonl")


def _register_stats(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(commands, "stats", _cmd_stats, "count prompts, responses, comparisons by choice, runs")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _register_config(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(commands, "config", _cmd_config,
                          "print every config field with its default and doc (a starting rlhf.toml)")
    parser.add_argument("--show", action="store_true",
                        help="print the effective config of the workspace instead (rlhf.toml + flags)")
    _add_model_option(parser)


# Every subcommand is registered here, in the order `--help` lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_prompts,
    _register_export,
    _register_import_pairs,
    _register_stats,
    _register_config,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Label preference pairs, train a reward model and run PPO, in a terminal. "
                               "Without a command, opens the app on the workspace.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _workspace_option(parser)
    _add_model_option(parser)
    parser.add_argument("--prompts", type=Path, metavar="FILE", help="import this prompts file before opening the app")
    parser.add_argument("--annotator", metavar="NAME", help="name stored with each decision (default: label.annotator "
                                                            "in rlhf.toml, else the OS user)")
    parser.set_defaults(handler=_cmd_app)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.handler(args)
    except RlhfError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`rlhf-tui prompts list | head`); silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
