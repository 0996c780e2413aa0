"""Architecture rules: the UI never loads the ML stack; the core (rlhf/) never imports Textual, the UI, the CLI
or the unshipped tools/; the console script starts headless commands without Textual; and nothing imports the
UI by its folder name `app`, which is installed as `rlhf_tui.app`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
# Modules that import the ML stack (tools/ holds the tiny-model builder): app/ must not import them either.
HEAVY_RLHF = ("rlhf.models", "rlhf.sampling", "rlhf.reward", "rlhf.ppo", "rlhf.engine.worker", "tools")
LIGHT_CORE = ("rlhf", "rlhf.config", "rlhf.store", "rlhf.hooks", "rlhf.errors", "rlhf.engine.protocol",
              "rlhf.engine.client")


UI = ("textual", "textual_plotext", "rlhf_tui")


def modules_loaded_by(statement: str, packages: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of the top-level `packages` are in sys.modules after running `statement` in a fresh interpreter."""
    code = (f"import sys, json\n{statement}\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(packages)!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def imported_names(source: str, package: str) -> set[str]:
    """Every module named by an import statement in `source`, a module of `package` (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def imported_by_file(path: Path) -> set[str]:
    return imported_names(path.read_text(encoding="utf-8"), ".".join(path.relative_to(ROOT).parts[:-1]))


def absolute_imports(source: str) -> set[str]:
    """Modules named by non-relative imports in `source` (`from .x import y` is left out)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def offenders(folder: str, is_bad, exempt: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """For each .py file under `folder` (but `exempt` ones): the names imported by it that `is_bad` flags."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        bad = sorted(n for n in imported_by_file(path) if is_bad(n))
        if bad and where not in exempt:
            found[where] = bad
    return found


def is_within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_importing_the_app_loads_no_ml_stack():
    assert modules_loaded_by("import rlhf_tui.app.main") == []


def test_every_app_module_imports_without_the_ml_stack():
    statement = ("import pkgutil, importlib, rlhf_tui.app as ui\n"
                 "for m in pkgutil.walk_packages(ui.__path__, 'rlhf_tui.app.'): importlib.import_module(m.name)")
    assert modules_loaded_by(statement) == []


def test_the_console_script_starts_headless_commands_without_textual_or_torch():
    statement = ("import contextlib, io\nfrom rlhf_tui.app import cli\n"
                 "with contextlib.redirect_stdout(io.StringIO()):\n    assert cli.main(['stats', '--help']) == 0")
    assert modules_loaded_by(statement, ("textual", *HEAVY)) == []


@pytest.mark.parametrize("module", LIGHT_CORE)
def test_light_core_modules_load_no_ml_stack(module):
    assert modules_loaded_by(f"import {module}") == []


def test_no_app_source_imports_the_ml_stack():
    assert offenders("app", lambda n: is_within(n, HEAVY + HEAVY_RLHF)) == {}


def test_no_core_source_imports_the_ui_the_cli_or_tools():
    # `app` is how a relative import from app/ would resolve, `rlhf_tui` the UI's installed name.
    assert offenders("rlhf", lambda n: is_within(n, (*UI, "app", "tools"))) == {}
    cli_package = tuple(path.relative_to(ROOT).as_posix() for path in (ROOT / "rlhf" / "cli").rglob("*.py"))
    assert offenders("rlhf", lambda n: is_within(n, ("rlhf.cli",)), exempt=cli_package) == {}


@pytest.mark.parametrize("folder", ["app", "tests", "benchmarks", "tools"])
def test_nothing_imports_the_ui_by_its_folder_name(folder):
    # Installed, the UI is rlhf_tui.app: inside app/ an absolute `import app...` finds nothing (or someone else's
    # `app`), so app/ imports itself relatively; from the checkout `import app` works, and would load a second
    # copy of every UI module beside rlhf_tui.app's.
    found = {path.relative_to(ROOT).as_posix(): sorted(bad) for path in sorted((ROOT / folder).rglob("*.py"))
             if (bad := {n for n in absolute_imports(path.read_text(encoding="utf-8")) if is_within(n, ("app",))})}
    assert found == {}


def test_imported_names_sees_relative_and_absolute_imports():
    # The scans above are only as good as this parser: check it on the forms they must catch.
    source = ("import torch.nn\nfrom transformers import AutoModel\nfrom ..widgets import answer\n"
              "from . import label\nfrom rlhf import sampling\n")
    names = imported_names(source, "app.screens")
    assert {"torch.nn", "transformers", "app.widgets", "app.widgets.answer", "app.screens.label",
            "rlhf.sampling"} <= names
    assert absolute_imports(source) == {"torch.nn", "transformers", "rlhf"}
