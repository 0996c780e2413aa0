"""The wheel carries every module, the app's styles and the bundled data (non-editable installs too)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_packages_styles_and_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("rlhf_tui-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {f"{p.relative_to(ROOT).as_posix()}" for pkg in ("rlhf", "app")
                for p in (ROOT / pkg).rglob("*") if p.suffix in (".py", ".tcss") and "__pycache__" not in p.parts}
    expected |= {"rlhf/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "data").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert expected - names == set()
    assert any(n.endswith("entry_points.txt") for n in names)
