"""The wheel carries every module, the app's styles and the bundled data (non-editable installs too), under
install names that cannot collide: the UI is `rlhf_tui.app`, so `import app` finds nothing of ours."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shipped_name(path: Path) -> str:
    """Where a source file of the checkout lands in the wheel: app/ under rlhf_tui/, data/ under rlhf/."""
    relative = path.relative_to(ROOT).as_posix()
    if relative.startswith("app/"):
        return "rlhf_tui/" + relative
    if relative.startswith("data/"):
        return "rlhf/" + relative
    return relative


def test_shipped_name_maps_the_renamed_folders():
    assert [shipped_name(ROOT / p) for p in ("app/main.py", "data/demo/prompts.txt", "rlhf/cli/runs.py")] == \
        ["rlhf_tui/app/main.py", "rlhf/data/demo/prompts.txt", "rlhf/cli/runs.py"]


def run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_wheel_ships_the_packages_under_their_install_names_and_installs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("rlhf_tui-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())

    sources = [p for folder in ("rlhf", "app") for p in (ROOT / folder).rglob("*")
               if p.suffix in (".py", ".tcss") and "__pycache__" not in p.parts]
    sources += [p for p in (ROOT / "data").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert {shipped_name(p) for p in sources} - names == set()
    # Nothing at the top level but our two names; tools/ and tests/ stay in the checkout.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"rlhf", "rlhf_tui"}
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "rlhf-tui = rlhf_tui.app.cli:main" in entry_points

    # A real install into a throwaway venv (dependencies from this environment), used from outside the checkout.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python, script = venv / "bin" / "python", venv / "bin" / "rlhf-tui"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, cwd=tmp_path)
    where = run(python, "-c", "import rlhf, rlhf_tui.app.main as ui; print(rlhf.__file__, ui.__file__)", cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.count(str(venv)) == 2, where.stderr
    for missing in ("app", "tools", "rlhf.tiny", "rlhf.demo"):
        found = run(python, "-c", f"import {missing}", cwd=tmp_path)
        assert f"ModuleNotFoundError: No module named '{missing}'" in found.stderr, missing
    helped = run(script, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "open the app on the workspace" in helped.stdout
    # `app` resolves to the UI's command: its own options, and its one-line error on a bad workspace.
    assert "--annotator NAME" in run(script, "app", "--help", cwd=tmp_path).stdout
    refused = run(script, "app", "--workspace", tmp_path / "missing", cwd=tmp_path)
    assert (refused.returncode, refused.stderr) == \
        (2, f"rlhf-tui: error: {tmp_path / 'missing'}: workspace directory does not exist "
            "(create it, or pass --workspace DIR)\n")


def test_the_installed_names_work_outside_the_checkout(tmp_path):
    # The editable install the tests run under: `rlhf_tui.app` resolves, `app` does not.
    ui = run(sys.executable, "-c", "import rlhf_tui.app.cli", cwd=tmp_path)
    assert ui.returncode == 0, ui.stderr
    assert "No module named 'app'" in run(sys.executable, "-c", "import app", cwd=tmp_path).stderr
