"""Where bundled assets live, in a source checkout and after a non-editable install."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir() -> Path:
    """`data/` of the checkout, or `rlhf/data` of an installed wheel (pyproject maps one to the other)."""
    for candidate in (_PACKAGE_DIR / "data", _PACKAGE_DIR.parent / "data"):
        if (candidate / "__init__.py").is_file():
            return candidate
    raise FileNotFoundError("rlhf-tui's bundled data/ folder is missing: reinstall the package")


def demo_model_dir() -> Path:
    return data_dir() / "demo" / "model"


def demo_prompts_file() -> Path:
    return data_dir() / "demo" / "prompts.txt"
