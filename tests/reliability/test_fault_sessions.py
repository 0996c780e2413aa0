"""Two labeling sessions on one workspace: prompts are claimed in the store (`prompt_claims`), so the two
engines never hand out the same prompt at the same time, and both sessions write without "database is locked".
Nothing the app or its engines run listens on the network.

One PPO run per workspace: tests/reliability/test_fault_kill.py (a second `rlhf-tui ppo` during a run) and
tests/test_ppo.py::test_lock_refuses_a_second_run_and_clears_a_stale_one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf_tui.app.main import RlhfApp
from fault_kit import network_sockets
from rlhf.engine import protocol
from rlhf.engine.client import EngineClient
from rlhf.store import PromptItem, Store
from test_label_screen import ready_to_decide

ENGINE_TIMEOUT_S = 300  # two cold engines import torch at once on a shared box
LABELS_EACH = 6

CLAIMING_SESSION = """
import sys
from rlhf.store import Store
store, held = Store(sys.argv[1]), []
for _ in range(2):
    held.append(store.claim_next_prompt(seed=0, held=held))
print(*held, flush=True)
sys.stdin.read()  # holds its claims while it lives
"""


def test_claims_keep_sessions_apart_release_on_decision_and_lapse_with_their_owner(tmp_path: Path):
    db = tmp_path / "rlhf.db"
    with Store(db) as store:
        ids, _ = store.add_prompts([PromptItem(f"prompt {i}") for i in range(4)], source="test")
    other = subprocess.Popen([sys.executable, "-c", CLAIMING_SESSION, str(db)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        theirs = {int(i) for i in other.stdout.readline().split()}
        with Store(db) as store:
            first = store.claim_next_prompt(seed=0)
            second = store.claim_next_prompt(seed=0, held=[first])
            assert {first, second} == set(ids) - theirs  # the same seed, yet never the other session's prompts
            # Everything is held: a repeat of our own comes before anything of theirs.
            assert store.claim_next_prompt(seed=0, held=[first, second]) in {first, second}
            # Deciding `first` drops it from what we hold: its claim goes, so it is free again.
            assert store.claim_next_prompt(seed=0, held=[second]) == first
            other.stdin.close()
            other.wait(60)
            # Their process is gone: its claims no longer count.
            assert store.claim_next_prompt(seed=0, held=[first, second]) in theirs
    finally:
        other.kill()


def _configure(workspace, prompts: int) -> None:
    with workspace.config_path.open("a") as f:
        f.write("[sampling]\nmax_new_tokens = 4\nprefetch = 2\n")
    with Store(workspace.db_path) as store:
        store.add_prompts([PromptItem(f"Question {i}: how do I plant a tree?") for i in range(prompts)], "test")


async def test_two_apps_label_one_workspace_without_serving_a_prompt_twice_at_once(workspace):
    _configure(workspace, prompts=10)
    cfg = workspace.load_config()
    app = RlhfApp(workspace, cfg, annotator="first")
    # The second app's engine, driven the way its label screen drives one: held pairs, NeedPairs with exclusions.
    second = EngineClient(workspace, cfg)
    second_held: list[protocol.PairReady] = []
    requested, ready, labeled = 0, False, {"first": 0, "second": 0}
    async with app.run_test() as pilot:
        screen = app.screen
        second.start()
        try:
            with Store(workspace.db_path) as store:
                deadline = time.monotonic() + ENGINE_TIMEOUT_S
                while min(labeled.values()) < LABELS_EACH:
                    assert time.monotonic() < deadline, f"labeled only {labeled}"
                    for event in second.poll():
                        assert not isinstance(event, protocol.Error), event
                        ready = ready or isinstance(event, protocol.Ready)
                        if isinstance(event, protocol.PairReady):
                            second_held.append(event)
                            requested -= 1
                    if ready and requested == 0 and len(second_held) < 3:
                        requested = 3 - len(second_held)
                        second.send(protocol.NeedPairs(requested, tuple(p.prompt_id for p in second_held)))
                    app_held = {p.prompt_id for p in (screen.current, *screen.queue) if p is not None}
                    assert app_held.isdisjoint(p.prompt_id for p in second_held), (app_held, second_held)
                    if ready_to_decide(screen) and labeled["first"] < LABELS_EACH:
                        await pilot.press("a")
                        labeled["first"] += 1
                    if second_held and labeled["second"] < LABELS_EACH:
                        pair = second_held.pop(0)
                        store.add_comparison(pair.prompt_id, pair.a.id, pair.b.id, "b", annotator="second")
                        labeled["second"] += 1
                    await pilot.pause(0.05)
            for pid in (os.getpid(), app.engine.pid, second.pid):
                assert network_sockets(pid) == [], pid
            assert screen.engine_error is None
        finally:
            second.stop()
    with Store(workspace.db_path) as store:
        annotators = [row["annotator"] for row in store.comparisons()]
    assert sorted(annotators) == ["first"] * LABELS_EACH + ["second"] * LABELS_EACH
