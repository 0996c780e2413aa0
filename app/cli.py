"""The `rlhf-tui` console command: opens the app (no command, or `app`), or hands any other command to the
headless CLI, `rlhf.cli`.

It lives on the UI side so the core never imports the UI: `rlhf.cli` knows nothing of the app, and this module
imports Textual only when the app opens, so headless commands start as fast as before.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf import cli
from rlhf.data_io import read_prompts
from rlhf.demo_mode import DEMO_NOTICE, DEMO_PROMPT_TAG, import_demo_prompts, is_demo
from rlhf.errors import RlhfError
from rlhf.store import Store

DESCRIPTION = ("Label preference pairs, train a reward model and run PPO, in a terminal. "
               "Without a command, opens the app on the workspace.")


def _cmd_app(args: argparse.Namespace) -> int:
    workspace, config = cli.load_config(args)
    prompts = getattr(args, "prompts", None)
    if prompts:
        read_prompts(prompts)  # a bad file fails before the database is created
        with Store(workspace.db_path) as store:
            print(cli.import_prompts_file(store, prompts, []))
    if is_demo(config):
        with Store(workspace.db_path) as store:
            imported = import_demo_prompts(store)
        if imported:  # all of the demo's prompts (over 200), or none
            print(f"{DEMO_NOTICE}: imported {imported} demo prompts (tag {DEMO_PROMPT_TAG!r}) "
                  "into this empty workspace")
    try:
        from .main import run_app
    except ModuleNotFoundError as exc:
        raise RlhfError(f"cannot start the app: module {exc.name!r} is missing (reinstall rlhf-tui)") from None
    return run_app(workspace, config, annotator=getattr(args, "annotator", None)) or 0


def _add_app_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: `rlhf-tui --prompts F app` keeps F (a subcommand's own default would reset it).
    parser.add_argument("--prompts", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help="import this prompts file before opening the app")
    parser.add_argument("--annotator", default=argparse.SUPPRESS, metavar="NAME",
                        help="name stored with each decision (default: label.annotator in rlhf.toml, else the OS user)")


def _register_app(commands: argparse._SubParsersAction) -> None:
    parser = cli.add_command(commands, "app", _cmd_app, "open the app on the workspace (the same as no command)")
    _add_app_options(parser)
    cli.add_model_option(parser)


def build_parser() -> argparse.ArgumentParser:
    """rlhf.cli's parser plus the app: the default handler, its options, and the `app` command listed first."""
    parser = cli.build_parser([_register_app, *cli.COMMANDS], description=DESCRIPTION)
    _add_app_options(parser)
    parser.set_defaults(handler=_cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, build_parser())


if __name__ == "__main__":
    raise SystemExit(main())
