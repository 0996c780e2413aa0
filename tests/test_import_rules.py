"""Architecture rules: the UI never loads the ML stack, and the core never imports Textual."""

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


def modules_loaded_by(statement: str) -> list[str]:
    """Top-level heavy packages in sys.modules after running `statement` in a fresh interpreter."""
    code = (f"import sys, json\n{statement}\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))")
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


def test_importing_the_app_loads_no_ml_stack():
    assert modules_loaded_by("import app.main") == []


def test_every_app_module_imports_without_the_ml_stack():
    statement = ("import pkgutil, importlib, app\n"
                 "for m in pkgutil.walk_packages(app.__path__, 'app.'): importlib.import_module(m.name)")
    assert modules_loaded_by(statement) == []


@pytest.mark.parametrize("module", LIGHT_CORE)
def test_light_core_modules_load_no_ml_stack(module):
    assert modules_loaded_by(f"import {module}") == []


def test_no_app_source_imports_the_ml_stack():
    offenders = {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        bad = {n for n in imported_by_file(path)
               if n.split(".")[0] in HEAVY or any(n == h or n.startswith(h + ".") for h in HEAVY_RLHF)}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_no_rlhf_source_imports_textual():
    offenders = {}
    for path in sorted((ROOT / "rlhf").rglob("*.py")):
        bad = {n for n in imported_by_file(path) if n.split(".")[0] in ("textual", "textual_plotext")}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_imported_names_sees_relative_and_absolute_imports():
    # The scans above are only as good as this parser: check it on the forms they must catch.
    source = ("import torch.nn\nfrom transformers import AutoModel\nfrom ..widgets import answer\n"
              "from . import label\nfrom rlhf import sampling\n")
    names = imported_names(source, "app.screens")
    assert {"torch.nn", "transformers", "app.widgets", "app.widgets.answer", "app.screens.label",
            "rlhf.sampling"} <= names
