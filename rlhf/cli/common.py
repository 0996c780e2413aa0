"""What every headless command shares: the workspace and its config with the command's flags applied
(`load_config`, `open_workspace`), the options every command or every model-loading command takes, and
printing helpers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import QUANTIZATION, Config, Workspace, keys_set_in
from ..data_io import terminal_json
from ..demo_mode import DEMO_NOTICE, is_demo, use_demo_threads, with_demo_defaults
from ..errors import RlhfError
from ..store import Store


PROG = "rlhf-tui"


@dataclass
class Session:
    workspace: Workspace
    config: Config
    store: Store


def load_config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> tuple[Workspace, Config]:
    """The --workspace directory and its rlhf.toml, with --model and `overrides` (`section.key`: value) applied.

    Overrides whose value is None (flags not given) leave the file's value alone. In demo mode (no model
    named), settings set neither in the file nor by a flag get the demo defaults.
    """
    workspace = Workspace(getattr(args, "workspace", None) or Path.cwd())
    if not workspace.root.is_dir():
        raise RlhfError(f"{workspace.root}: workspace directory does not exist (create it, or pass --workspace DIR)")
    overrides = {"model.name": getattr(args, "model", None), **(overrides or {})}
    overrides.setdefault("model.quantization", getattr(args, "quantization", None))
    config = workspace.load_config().override(overrides)
    chosen = keys_set_in(workspace.config_path) | {key for key, value in overrides.items() if value is not None}
    return workspace, with_demo_defaults(config, chosen)


@contextmanager
def open_workspace(args: argparse.Namespace, overrides: dict[str, Any] | None = None, *,
                   create: bool = False) -> Iterator[Session]:
    """`load_config` plus the workspace store, closed afterwards.

    Without `create`, a workspace that has no rlhf.db yet is an error rather than a new empty database:
    read-only commands run in the wrong directory should say so, not leave a database behind. Runs left
    "running" by a process that was killed are marked interrupted first, so every command sees the truth.
    """
    workspace, config = load_config(args, overrides)
    if not create and not workspace.db_path.exists():
        raise RlhfError(f"{workspace.root}: no {workspace.db_path.name} here yet "
                        "(import prompts with `rlhf-tui prompts import FILE`, or pass --workspace DIR)")
    with Store(workspace.db_path) as store:
        store.mark_interrupted_runs()
        yield Session(workspace, config, store)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def print_json(value: Any) -> None:
    print(terminal_json(value))


def enter_demo_mode(config: Config) -> None:
    """Headless runs on the demo model say so on stderr (the app says so in its header) and use its threads."""
    if is_demo(config):
        print(f"{DEMO_NOTICE} (laptop-CPU demo defaults apply to unset settings: `{PROG} config --show`)",
              file=sys.stderr)
        use_demo_threads(config)


def workspace_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand that does not see the flag must not reset the value given before it.
    parser.add_argument("--workspace", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                        help="workspace directory holding rlhf.toml, rlhf.db and runs/ (default: current directory)")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=argparse.SUPPRESS, metavar="ID_OR_PATH",
                        help="hub id or local path of the base model (default: model.name in rlhf.toml)")


def add_quantization_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--quantization", choices=QUANTIZATION, default=argparse.SUPPRESS,
                        help=f"{what}: none, 4bit (bitsandbytes NF4) or 8bit")


def add_command(commands: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
                 summary: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=summary, description=summary)
    workspace_option(parser)
    parser.set_defaults(handler=handler)
    return parser
