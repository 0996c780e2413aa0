"""Label screen latency: key -> next pair shown (prefetch on and off, and while a PPO run trains), and launch
-> first frame.

    python benchmarks/bench_label.py [--model DIR] [--decisions 20] [--think 2.0] [--launches 5]

The app runs headless (Textual's run_test) against a real engine process. "Shown" means the key
event has been handled and the screen refresh with the next pair is done. A person needs time to read
and decide (--think seconds between keys); with prefetch the engine fills the queue meanwhile.
Launch -> first frame starts a fresh Python process that imports the app and runs it headless, and
stops the clock when its first screen refresh is done. Goals: p95 < 50 ms with prefetch, also during a
run; first frame < 1.5 s. Without --model it builds the tiny random Llama the tests use.

During PPO: a workspace of hidden-rule pairs gets a one-epoch reward run (trained in this process first), the
app starts a PPO run after its first pair, and every key is timed while the run trains; the engine samples the
next pairs from the run's policy between its steps.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.config import Workspace  # noqa: E402
from rlhf.store import PromptItem, Store  # noqa: E402

PREFETCH_SETTINGS = (4, 0)
DURING_PPO_PREFETCH = 4
# A tiny PPO run that outlasts the decisions: 4 prompts a step, 16 new tokens, a checkpoint every 10 steps.
PPO_TOML = ("[ppo]\nsteps = 100000\nbatch_size = 4\nminibatches = 2\nppo_epochs = 1\nmax_new_tokens = 16\n"
            "checkpoint_every = 10\n")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def make_workspace(root: Path, model: str, prefetch: int, prompts: int) -> Workspace:
    ws = Workspace(root)
    ws.root.mkdir(parents=True)
    ws.config_path.write_text(f'[model]\nname = "{model}"\n[sampling]\nprefetch = {prefetch}\nmax_new_tokens = 32\n',
                              encoding="utf-8")
    with Store(ws.db_path) as store:
        store.add_prompts([PromptItem(f"Question {i}: how do I make a simple soup?") for i in range(prompts)], "bench")
    return ws


def make_ppo_workspace(root: Path, model: str, prefetch: int) -> tuple[Workspace, str]:
    """A workspace of hidden-rule pairs (their 40 prompts are labeled again) with a finished reward run."""
    from rlhf.reward import train_reward
    from tools.tiny import hidden_rule_pairs, workspace_with_pairs

    ws = workspace_with_pairs(root, model, hidden_rule_pairs(40, 2),
                              f"[sampling]\nprefetch = {prefetch}\nmax_new_tokens = 32\n{PPO_TOML}")
    result = train_reward(ws, ws.load_config().override({"reward.epochs": 1}))
    if result.status != "finished":
        raise SystemExit(f"reward run {result.status}: {result.message}")
    return ws, result.run_id


async def key_to_next_pair(ws: Workspace, decisions: int, think_s: float,
                           ppo_reward_run: str | None = None) -> tuple[list[float], list[bool], list[bool]]:
    """Milliseconds from each key event to the screen refresh that shows the next pair; for each key whether a
    pair was ready (a miss waits for the engine to sample one), and whether the pair shown came from a run.

    With `ppo_reward_run`, a PPO run against it starts after the first pair, and the keys are timed while it
    trains.

    The key is posted to the app directly: Pilot.press also waits for the whole process to go idle,
    which on a busy machine adds far more than the app itself takes.
    """
    from textual import events

    from rlhf.engine import protocol
    from rlhf_tui.app.main import RlhfApp

    app = RlhfApp(ws, ws.load_config(), annotator="bench")
    latencies, ready, from_run = [], [], []
    async with app.run_test(size=(140, 40)) as pilot:
        screen = app.screen
        shown = asyncio.Event()
        show = screen._show

        def show_and_mark(pair, note=None):  # the screen's own _show, plus a mark once it is painted
            show(pair, note)
            if pair is not None:
                screen.call_after_refresh(shown.set)

        screen._show = show_and_mark
        deadline = time.monotonic() + 300
        while screen.current is None:
            assert time.monotonic() < deadline, "no first pair"
            await pilot.pause(0.05)
        if ppo_reward_run is not None:
            app.engine.send(protocol.StartPPO(config=app.config, reward_run=ppo_reward_run))
            while screen.ppo_run is None:
                assert time.monotonic() < deadline, "the PPO run did not start"
                await pilot.pause(0.05)
        for _ in range(decisions):
            await asyncio.sleep(think_s)
            shown.clear()
            ready.append(bool(screen.queue))
            start = time.perf_counter()
            app.post_message(events.Key("a", "a"))
            await asyncio.wait_for(shown.wait(), 300)
            latencies.append((time.perf_counter() - start) * 1000)
            from_run.append(screen.current.run_id is not None)
        if ppo_reward_run is not None:
            assert screen.ppo_run is not None, "the PPO run ended before the last key"
    return latencies, ready, from_run


FIRST_FRAME_CHILD = """
import sys, time
start = float(sys.argv[2])
from rlhf.config import Workspace
from rlhf_tui.app.main import RlhfApp

class FirstFrame(RlhfApp):
    def on_mount(self):  # runs after RlhfApp.on_mount (Textual calls each class's handler)
        self.call_after_refresh(self.first_frame)

    def first_frame(self):
        self.elapsed = time.time() - start
        self.exit()

if __name__ == "__main__":
    ws = Workspace(sys.argv[1])
    app = FirstFrame(ws, ws.load_config(), annotator="bench")
    app.run(headless=True, size=(140, 40))
    print(app.elapsed)
"""


def launch_to_first_frame(ws: Workspace, script: Path) -> float:
    start = time.time()
    out = subprocess.run([sys.executable, str(script), str(ws.root), repr(start)], cwd=ROOT, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"first-frame child failed:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: build the tiny test Llama)")
    parser.add_argument("--decisions", type=int, default=20)
    parser.add_argument("--think", type=float, default=2.0, help="seconds between keys (reading time)")
    parser.add_argument("--launches", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model
        if model is None:
            from tools.tiny import build_tiny_llama

            model = str(build_tiny_llama(tmp / "tiny-llama"))
        print(f"model: {args.model or 'tiny random Llama'}; think time {args.think} s; max_new_tokens 32")
        print(f"{'measure':<34} {'n':>3} {'median ms':>10} {'p95 ms':>9} {'max ms':>9}", flush=True)
        script = tmp / "first_frame.py"
        script.write_text(FIRST_FRAME_CHILD, encoding="utf-8")
        ws = make_workspace(tmp / "ws-launch", model, 4, prompts=10)
        print_row("launch -> first frame", [launch_to_first_frame(ws, script) for _ in range(args.launches)])
        for prefetch in PREFETCH_SETTINGS:
            ws = make_workspace(tmp / f"ws-prefetch-{prefetch}", model, prefetch, prompts=args.decisions + 10)
            ms, ready, _ = asyncio.run(key_to_next_pair(ws, args.decisions, args.think))
            print_row(f"key -> next pair, prefetch {prefetch}", ms)
            print_readiness(ms, ready)
        ws, reward_run = make_ppo_workspace(tmp / "ws-ppo", model, DURING_PPO_PREFETCH)
        ms, ready, from_run = asyncio.run(key_to_next_pair(ws, args.decisions, args.think, reward_run))
        print_row(f"key -> next pair, during PPO, pf {DURING_PPO_PREFETCH}", ms)
        print_readiness(ms, ready)
        print_row("  of which the run's policy sampled", [m for m, run in zip(ms, from_run) if run])


def print_readiness(ms: list[float], ready: list[bool]) -> None:
    print_row("  of which a pair was ready", [m for m, hit in zip(ms, ready) if hit])
    print_row("  of which none was ready", [m for m, hit in zip(ms, ready) if not hit])


def print_row(name: str, ms: list[float]) -> None:
    if not ms:
        print(f"{name:<34} {0:>3}", flush=True)
        return
    print(f"{name:<34} {len(ms):>3} {statistics.median(ms):>10.1f} {percentile(ms, 95):>9.1f} {max(ms):>9.1f}",
          flush=True)


if __name__ == "__main__":
    main()
