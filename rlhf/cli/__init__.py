"""The headless `rlhf-tui` commands (`python -m rlhf.cli`), each run on a workspace. The app (no command, or
`app`) is added by the UI side's entry, `rlhf_tui.app.cli` (app/cli.py), which is the console script: this package
never imports the UI.

One module per group of commands: `data` (prompts, export, import-pairs, stats, config), `runs` (train-reward, ppo,
score, export-reward, export-bundle, runs), `refit`, `eval`; `common` holds what they share. Adding a command: write
`_cmd_<name>(args) -> int` and `_register_<name>(commands)` in its group's module, then add the register function to
`COMMANDS` here. `add_command` gives every subcommand `--workspace` (accepted before or after the command name);
`add_model_option` adds `--model` to commands that load a model; `load_config` / `open_workspace` give the
workspace, its config with CLI overrides applied, and its store. User errors are `RlhfError`s: `main` prints them
on one line and returns exit code 2. Heavy modules (torch) are imported inside the commands that need them, never
at import time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import RlhfError, RunCancelled
from .common import (PROG, Session, add_command, add_model_option, add_quantization_option, load_config, open_workspace,
                     workspace_option)
from .data import (import_prompts_file, register_config, register_export, register_import_pairs, register_prompts,
                   register_stats)
from .eval import register_eval
from .refit import register_refit
from .runs import (ConsoleProgress, register_export_bundle, register_export_reward, register_ppo, register_runs,
                   register_score, register_train_reward)

__all__ = ["PROG", "Session", "load_config", "open_workspace", "add_command", "add_model_option", "import_prompts_file",
           "ConsoleProgress", "COMMANDS", "build_parser", "main"]  # the public API (app/cli.py, tests)


# Every subcommand is registered here, in the order `--help` lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_prompts,
    register_export,
    register_import_pairs,
    register_stats,
    register_config,
    register_train_reward,
    register_score,
    register_export_reward,
    register_export_bundle,
    register_ppo,
    register_refit,
    register_runs,
    register_eval,
]


def _no_command(args: argparse.Namespace) -> int:
    raise RlhfError("name a command (see --help); `rlhf-tui` with no command opens the app")


def build_parser(commands: Sequence[Callable[[argparse._SubParsersAction], None]] = COMMANDS, *,
                 description: str = "Label preference pairs, train a reward model and run PPO: the headless "
                                    "commands.") -> argparse.ArgumentParser:
    """The parser for `commands` (in `--help` order) and the options accepted before any command name.

    The UI's entry (app/cli.py) passes its `app` command too and makes opening the app the default.
    """
    parser = argparse.ArgumentParser(prog=PROG, description=description)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    workspace_option(parser)
    add_model_option(parser)
    add_quantization_option(parser, "the base model's weights ([model] quantization)")
    parser.set_defaults(handler=_no_command)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in commands:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command line (`parser` defaults to `build_parser()`); the exit code. Errors are one line."""
    try:
        args = (parser or build_parser()).parse_args(argv)
        args.command_line = list(sys.argv[1:] if argv is None else argv)  # what `--processes` starts again
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.handler(args)
    except RunCancelled as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
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
