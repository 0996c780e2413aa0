"""How responsive the app stays while the engine trains: event-loop lag, idle, during reward training and
during PPO on a ~35M-parameter Llama (hidden 512, 10 layers, intermediate 1536).

    python benchmarks/bench_ui_lag.py [--ppo-steps 8] [--idle-s 5] [--workdir DIR]

The real app runs headless (Textual's test driver: layout and rendering happen, the terminal write does
not) with a real engine process. A callback re-armed every 10 ms on the app's event loop records how
late it runs; a key event, a redraw or an engine batch that hogs the loop shows up as lateness. The
Reward model and Train screens are driven through their own actions, as a person would with the keys.
The first showing of a screen (mounting and styling its widgets, a one-off) is reported apart from the
steady state. Goal (issue 6): p99 lag below 50 ms while PPO runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_tui.app.main import RlhfApp  # noqa: E402
from rlhf.config import Workspace  # noqa: E402

PROBE_INTERVAL_S = 0.010
FIRST_PAINT_S = 3.0
MODEL_SHAPE = {"hidden_size": 512, "num_layers": 10, "intermediate_size": 1536, "num_heads": 8}
PPO_SETTINGS = "[ppo]\nbatch_size = 4\nminibatches = 2\nppo_epochs = 1\nmax_new_tokens = 16\ncheckpoint_every = 5\n"


class LagProbe:
    """Re-arms itself every PROBE_INTERVAL_S on the loop; records each run's lateness under the current phase."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.phase = "start"
        self.lateness: dict[str, list[float]] = {}
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self, phase: str) -> None:
        self.phase = phase
        self._arm()

    def _arm(self) -> None:
        self._due = self.loop.time() + PROBE_INTERVAL_S
        self._handle = self.loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        self.lateness.setdefault(self.phase, []).append(self.loop.time() - self._due)
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, round(q / 100 * len(ranked)) - 1))]


def build_workspace(workdir: Path, ppo_steps: int) -> Workspace:
    """The ~35M model and a workspace with 24 hidden-rule pairs; run in a child process (see main)."""
    from tools.tiny import build_tiny_llama, hidden_rule_pairs, workspace_with_pairs

    model = build_tiny_llama(workdir / "model-35m", **MODEL_SHAPE)
    return workspace_with_pairs(
        workdir / "ws", model, hidden_rule_pairs(8, 3),
        "[sampling]\nprefetch = 0\nmax_new_tokens = 8\n"
        f"[reward]\nepochs = 1\nbatch_size = 8\nheldout_fraction = 0.2\n{PPO_SETTINGS}steps = {ppo_steps}\n")


async def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def switch(app: RlhfApp, probe: LagProbe, mode: str) -> None:
    """Show a screen for the first time: mounting and styling its widgets is a one-off cost, measured apart."""
    probe.phase = "first showing of a screen"
    await app.switch_mode(mode)
    await asyncio.sleep(FIRST_PAINT_S)


async def measure(ws: Workspace, idle_s: float) -> tuple[dict[str, list[float]], dict[str, float]]:
    app = RlhfApp(ws, ws.load_config(), annotator="bench")
    figures: dict[str, float] = {}
    async with app.run_test(size=(120, 40)):
        probe = LagProbe(asyncio.get_running_loop())
        probe.start("engine starting")
        label = app.screen
        await wait_for(lambda: label.engine_info is not None, 600, "the engine")
        probe.phase = "idle (label screen)"
        await asyncio.sleep(idle_s)

        await switch(app, probe, "reward")
        reward = app.screen
        probe.phase = "reward training (35M)"
        started = time.monotonic()
        reward.action_start()
        await wait_for(lambda: reward.run_id is not None and reward.view.feed.final, 1800, "reward training")
        figures["reward training s"] = time.monotonic() - started
        if reward.view.feed.status != "finished":
            raise RuntimeError(f"reward training ended {reward.view.feed.status}: {reward.view.feed.message}")

        await switch(app, probe, "train")
        train = app.screen
        probe.phase = "PPO loading (35M)"
        train.action_start()
        await wait_for(lambda: train.run_id is not None, 600, "PPO to start")
        started = time.monotonic()
        probe.phase = "PPO panes first shown"
        await asyncio.sleep(FIRST_PAINT_S)
        probe.phase = "PPO steps (35M)"
        await wait_for(lambda: train.view.feed.final, 3600, "PPO to finish")
        figures["PPO s/step"] = (time.monotonic() - started) / max(1, train.view.feed.step)
        figures["PPO tokens/s"] = train.view.feed.latest("tokens_per_s") or 0.0
        figures["PPO steps"] = float(train.view.feed.step)
        figures["reward chart redraws"] = float(train.view.chart("chart-reward").redraws)
        probe.stop()
    return probe.lateness, figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppo-steps", type=int, default=8)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, help="where the model and workspace go (default: a temp dir)")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_workspace(args.workdir, args.ppo_steps)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        # Built in a child: like the app, the measured process never imports torch, whose millions of
        # objects would make Python's garbage collector stall the loop for a second now and then.
        subprocess.run([sys.executable, __file__, "--build-only", "--workdir", str(workdir),
                        "--ppo-steps", str(args.ppo_steps)], check=True)
        assert "torch" not in sys.modules
        lateness, figures = asyncio.run(measure(Workspace(workdir / "ws"), args.idle_s))
    print(f"\nevent-loop lag (a {PROBE_INTERVAL_S * 1000:.0f} ms probe's lateness), ms")
    print(f"{'phase':<26}{'samples':>8}{'median':>9}{'p95':>9}{'p99':>9}{'max':>9}")
    for phase, values in lateness.items():
        ms = [v * 1000 for v in values]
        print(f"{phase:<26}{len(ms):>8}{statistics.median(ms):>9.2f}{percentile(ms, 95):>9.2f}"
              f"{percentile(ms, 99):>9.2f}{max(ms):>9.2f}")
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
