"""The engine: sampling math, the pair sampler on the tiny model, and a real engine process."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rlhf.config import Config, SamplingConfig, Workspace
from rlhf.engine import protocol
from rlhf.engine.client import EngineClient, describe_exit
from rlhf.sampling import PairSampler, a_side_first, cut_at_eos, generation_seed, sampling_params
from rlhf.tokens import truncate_left
from rlhf.store import PromptItem, Store

ROOT = Path(__file__).resolve().parents[1]
EVENT_TIMEOUT_S = 300  # generous: a cold, low-priority engine imports torch first, slow on a busy machine


# -- pure functions ----------------------------------------------------------------------------


def test_truncate_left_keeps_the_end():
    assert truncate_left([1, 2, 3, 4, 5], 3) == ([3, 4, 5], 2)
    assert truncate_left([1, 2], 3) == ([1, 2], 0)
    assert truncate_left([1, 2, 3], 3) == ([1, 2, 3], 0)


def test_generation_seed_is_deterministic_and_distinct_per_draw():
    assert generation_seed(0, 7, 2) == generation_seed(0, 7, 2)
    seeds = {generation_seed(0, 7, draw, resample) for draw in range(4) for resample in range(3)}
    assert len(seeds) == 12  # every (draw, resample) gets its own seed
    assert generation_seed(1, 7, 2) != generation_seed(0, 7, 2)
    assert generation_seed(0, 8, 2) != generation_seed(0, 7, 2)
    assert all(0 <= s < 2**31 for s in seeds)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 0, 0], {2}) == ([5, 6], True)
    assert cut_at_eos([5, 6, 7], {2}) == ([5, 6, 7], False)
    assert cut_at_eos([2, 5], {2, 9}) == ([], True)
    assert cut_at_eos([5, 9, 2], {2, 9}) == ([5], True)


def test_a_side_first_is_a_seeded_coin():
    flips = [a_side_first(0, prompt_id, 2 * prompt_id, 2 * prompt_id + 1) for prompt_id in range(200)]
    assert flips == [a_side_first(0, p, 2 * p, 2 * p + 1) for p in range(200)]
    assert 70 < sum(flips) < 130  # both sides happen, about half the time each
    assert flips != [a_side_first(1, p, 2 * p, 2 * p + 1) for p in range(200)]


def test_sampling_params_are_the_generation_settings_only():
    cfg = SamplingConfig(temperature=1.5, top_k=40, top_p=0.9, max_new_tokens=12, repetition_penalty=1.1,
                         seed=3, prefetch=2, max_resample=1)
    assert sampling_params(cfg) == {"temperature": 1.5, "top_k": 40, "top_p": 0.9, "max_new_tokens": 12,
                                    "repetition_penalty": 1.1}


def test_describe_exit():
    assert "SIGKILL" in describe_exit(-signal.SIGKILL) and "out of memory" in describe_exit(-signal.SIGKILL)
    assert "SIGTERM" in describe_exit(-signal.SIGTERM)
    assert describe_exit(1) == "the engine process exited with code 1"


# -- the sampler, in this process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir):
    from rlhf.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_sampler_draws_two_answers_in_one_call(tiny_policy):
    model, tokenizer = tiny_policy
    sampler = PairSampler(model, tokenizer, SamplingConfig(max_new_tokens=6, temperature=1.5), max_prompt_tokens=64)
    pair = sampler.sample("How do I cook rice?", None, prompt_id=1, draw=0)
    assert len(pair.answers) == 2 and pair.answers[0].text != pair.answers[1].text
    assert pair.seed == generation_seed(0, 1, 0, 0)  # different answers: no re-sample
    assert all(0 <= a.tokens <= 6 and (a.finished or a.tokens == 6) for a in pair.answers)
    assert pair.notices == []
    again = sampler.sample("How do I cook rice?", None, prompt_id=1, draw=0)
    assert [a.text for a in again.answers] == [a.text for a in pair.answers]  # seeded


def test_sampler_resamples_identical_twins_then_gives_a_notice(tiny_policy):
    model, tokenizer = tiny_policy
    # A near-zero temperature makes sampling greedy: both answers are always the same.
    cfg = SamplingConfig(max_new_tokens=4, temperature=1e-6, max_resample=2)
    pair = PairSampler(model, tokenizer, cfg, max_prompt_tokens=64).sample("hi", None, prompt_id=1, draw=0)
    assert pair.answers[0].text == pair.answers[1].text
    assert pair.notices == ["both answers are identical after 2 re-samples"]
    assert pair.seed == generation_seed(0, 1, 0, 2)  # the last of 1 + 2 draws


def test_sampler_cuts_long_prompts_from_the_left(tiny_policy):
    model, tokenizer = tiny_policy
    sampler = PairSampler(model, tokenizer, SamplingConfig(max_new_tokens=2), max_prompt_tokens=8)
    pair = sampler.sample("the cat sees a red house and the dog likes the old garden " * 3, None, prompt_id=1, draw=0)
    assert pair.prompt_tokens == 8
    assert len(pair.notices) == 1 and pair.notices[0].startswith("prompt cut to its last 8 tokens (")


# -- a real engine process -----------------------------------------------------------------------


@contextmanager
def running_engine(workspace: Workspace, config: Config | None = None) -> Iterator[EngineClient]:
    """A real engine process on the test's workspace with `config` (default: its rlhf.toml as it is now),
    stopped when the test is done with it."""
    client = EngineClient(workspace, config or workspace.load_config())
    client.start()
    try:
        yield client
    finally:
        client.stop()


# Events polled but not yet consumed, per client: one poll can return several events (two pairs
# sampled back to back), and a waiter that returned the first must not drop the rest.
_unconsumed: weakref.WeakKeyDictionary[EngineClient, deque[protocol.Event]] = weakref.WeakKeyDictionary()


def wait_for(client: EngineClient, kind: type, timeout_s: float = EVENT_TIMEOUT_S,
             seen: list | None = None) -> protocol.Event:
    """The next event of `kind`, polling until it arrives; events before it are appended to `seen`.
    An Error while waiting for something else fails at once, with its message."""
    backlog = _unconsumed.setdefault(client, deque())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        backlog.extend(client.poll())
        while backlog:
            event = backlog.popleft()
            if seen is not None:
                seen.append(event)
            if isinstance(event, kind):
                return event
            assert not isinstance(event, protocol.Error), event
        time.sleep(0.02)
    raise AssertionError(f"no {kind.__name__} within {timeout_s}s")


def configure(workspace: Workspace, **sampling) -> None:
    text = workspace.config_path.read_text() + "[sampling]\n" + "".join(f"{k} = {v}\n" for k, v in sampling.items())
    workspace.config_path.write_text(text)


def test_engine_serves_pairs_with_stored_provenance_and_survives_errors(workspace, store, tiny_model_dir):
    configure(workspace, max_new_tokens=5, temperature=1.3)
    # The engine samples as the config it is given says (the app's), not as rlhf.toml (which has no top_k).
    with running_engine(workspace, workspace.load_config().override({"sampling.top_k": 50})) as client:
        seen: list = []
        ready = wait_for(client, protocol.Ready, seen=seen)
        assert isinstance(seen[0], protocol.Status) and seen[0].stage == protocol.STARTING
        assert ready.model_label == tiny_model_dir.name and ready.adapter is None
        assert ready.sampling["temperature"] == 1.3 and ready.sampling["top_k"] == 50

        client.send(protocol.NeedPairs(1))  # no prompts yet: a user error, and the engine keeps serving
        error = wait_for(client, protocol.Error)
        assert error.message.startswith("no prompts to label") and not error.fatal and error.request == "NeedPairs"

        ids, _ = store.add_prompts([PromptItem(f"Question {i}: how do I bake bread?") for i in range(4)], "test")
        client.send(protocol.NeedPairs(3, exclude_prompt_ids=(ids[0],)))
        pairs = []
        for _ in range(3):
            pair = wait_for(client, protocol.PairReady)
            # Stored (with provenance) before the event was sent:
            for view in (pair.a, pair.b):
                row = store.response(view.id)
                assert row["prompt_id"] == pair.prompt_id and row["text"] == view.text
                assert row["model"] == str(tiny_model_dir) and row["adapter"] is None
                assert row["sampling"] == ready.sampling and row["seed"] is not None
                assert row["response_tokens"] == view.tokens <= 5 and row["prompt_tokens"] > 0
                assert row["finished"] in (0, 1) and row["source"] == "generated"
            assert store.response(pair.a.id)["seed"] == store.response(pair.b.id)["seed"]  # one generate call
            pairs.append(pair)
        assert sorted(p.prompt_id for p in pairs) == sorted(ids[1:])  # the excluded prompt is not sampled
        assert not any(p.regenerated for p in pairs)

        first = pairs[0]
        client.send(protocol.Regenerate(first.prompt_id))
        fresh = wait_for(client, protocol.PairReady)
        assert fresh.regenerated and fresh.prompt_id == first.prompt_id
        assert {fresh.a.id, fresh.b.id}.isdisjoint({first.a.id, first.b.id})
        assert store.response(fresh.a.id)["seed"] != store.response(first.a.id)["seed"]

        client.send(protocol.Regenerate(99999))
        error = wait_for(client, protocol.Error)
        assert "99999" in error.message and not error.fatal and error.request == "Regenerate"
        client.send(protocol.NeedPairs(1))
        assert isinstance(wait_for(client, protocol.PairReady), protocol.PairReady)

        os.kill(client.pid, signal.SIGKILL)  # as the OOM killer would
        death = wait_for(client, protocol.Error)
        assert death.fatal and "SIGKILL" in death.message
        assert not client.alive and client.poll() == []  # reported once
        assert not client.send(protocol.NeedPairs(1))


def save_ppo_policy(store: Store, workspace: Workspace, model_dir: Path, model_name: str) -> Path:
    """A PPO run row whose checkpoint holds a LoRA policy adapter saved the way rlhf.ppo saves it."""
    from peft import LoraConfig, get_peft_model

    from rlhf.models import load_causal_lm

    checkpoint = workspace.run_dir("ppo-test") / "checkpoints" / "step-1"
    model = get_peft_model(load_causal_lm(str(model_dir)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                           adapter_name="policy")
    model.save_pretrained(checkpoint, selected_adapters=["policy"], safe_serialization=True)
    cfg = workspace.load_config()
    cfg.model.name = model_name
    run_id = store.create_run("ppo", cfg.to_dict(), run_id=f"ppo-{len(store.runs())}")
    store.update_run(run_id, status="finished", checkpoint=str(checkpoint), checkpoint_step=1)
    return checkpoint / "policy"


def test_latest_policy_adapter_matches_the_base(workspace, store, tiny_model_dir):
    from rlhf.engine.worker import latest_policy_adapter

    assert latest_policy_adapter(store, workspace, str(tiny_model_dir)) is None
    adapter = save_ppo_policy(store, workspace, tiny_model_dir, str(tiny_model_dir))
    assert latest_policy_adapter(store, workspace, str(tiny_model_dir)) == adapter
    assert latest_policy_adapter(store, workspace, "some/other-model") is None


def test_engine_samples_from_the_ppo_policy_and_stops_cleanly(workspace, store, tiny_model_dir):
    configure(workspace, max_new_tokens=3)
    adapter = save_ppo_policy(store, workspace, tiny_model_dir, str(tiny_model_dir))
    store.add_prompts([PromptItem("How do I roast vegetables?")], "test")
    with running_engine(workspace) as client:
        assert wait_for(client, protocol.Ready).adapter == str(adapter)
        client.send(protocol.NeedPairs(1))
        pair = wait_for(client, protocol.PairReady)
        assert store.response(pair.a.id)["adapter"] == store.response(pair.b.id)["adapter"] == str(adapter)
    assert client.exitcode == 0 and not client.alive


def add_labeled_pairs(store: Store, count: int) -> None:
    ids, _ = store.add_prompts([PromptItem(f"Tell me about the river number {i}.") for i in range(count)], "test")
    for i, prompt_id in enumerate(ids):
        good = store.add_response(prompt_id, f"The river {i} is long and calm.", model=None)
        bad = store.add_response(prompt_id, "No.", model=None)
        store.add_comparison(prompt_id, good, bad, "a")


def test_engine_runs_reward_training_with_graceful_and_hard_stops(workspace, store):
    add_labeled_pairs(store, 12)
    with running_engine(workspace) as client:
        wait_for(client, protocol.Ready)
        # Graceful: the run ends at its next step with status "stopped".
        long_run = workspace.load_config().override({"reward.epochs": 500, "reward.batch_size": 2})
        client.send(protocol.StartReward(long_run))
        started = wait_for(client, protocol.RunStarted)
        assert started.kind == "reward" and started.total_steps == store.run(started.run_id).total_steps >= 500
        client.send(protocol.StopRun(started.run_id))
        ended = wait_for(client, protocol.RunEnded)
        assert (ended.result.run_id, ended.result.status) == (started.run_id, "stopped")
        assert store.run(started.run_id).status == "stopped"
        assert ended.result.checkpoint and Path(ended.result.checkpoint).is_dir()

        # Hard: the engine marks the run stopped and exits; the client starts a fresh engine.
        client.send(protocol.StartReward(long_run))
        started = wait_for(client, protocol.RunStarted)
        wait_for(client, protocol.RunStep)
        old_pid = client.pid
        client.send(protocol.StopRun(None, hard=True))
        ended = wait_for(client, protocol.RunEnded)
        result = ended.result
        assert (result.run_id, result.status) == (started.run_id, "stopped") and "hard stop" in result.message
        restarted = wait_for(client, protocol.Status)
        assert restarted.stage == protocol.STARTING and client.pid != old_pid
        wait_for(client, protocol.Ready)
        run = store.run(started.run_id)
        assert run.status == "stopped" and "hard stop" in run.error


def test_the_labeling_model_is_freed_during_a_run_and_samples_again_after(workspace, store):
    # "auto" frees it on a GPU only; "always" takes the same path on this CPU.
    workspace.config_path.write_text(workspace.config_path.read_text().replace(
        "[model]\n", '[model]\nfree_during_runs = "always"\n') + "[sampling]\nmax_new_tokens = 3\n")
    add_labeled_pairs(store, 12)
    with running_engine(workspace) as client:
        wait_for(client, protocol.Ready)
        client.send(protocol.StartReward(workspace.load_config().override({"reward.epochs": 1,
                                                                           "reward.batch_size": 4})))
        seen: list = []
        ended = wait_for(client, protocol.RunEnded, seen=seen)
        statuses = [e.message for e in seen if isinstance(e, protocol.Status)]
        assert ended.result.status == "finished" and statuses == ["freeing the labeling model for the run…"]
        after: list = []
        wait_for(client, protocol.Ready, seen=after)  # the model is loaded again once the run has ended
        assert [e.message for e in after if isinstance(e, protocol.Status)] == [
            f"loading model {workspace.load_config().model.name} again…"]
        client.send(protocol.NeedPairs(1))
        pair = wait_for(client, protocol.PairReady)
        assert store.response(pair.a.id)["model"] == workspace.load_config().model.name


def test_a_model_that_cannot_load_is_one_fatal_error_in_the_users_words(workspace, tmp_path):
    workspace.config_path.write_text(f'[model]\nname = "{(tmp_path / "no-such-model").as_posix()}"\n')
    with running_engine(workspace) as client:
        error = wait_for(client, protocol.Error)
        assert error.fatal and error.message.startswith("cannot load model") and "--model" in error.message
        deadline = time.monotonic() + 30
        while client.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.exitcode == 1
        assert [e for e in client.poll() if isinstance(e, protocol.Error)] == []  # not reported twice


def pid_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_leaves_no_engine(workspace):
    script = textwrap.dedent(f"""
        import sys, time
        from rlhf.config import Workspace
        from rlhf.engine import protocol
        from rlhf.engine.client import EngineClient
        workspace = Workspace({str(workspace.root)!r})
        client = EngineClient(workspace, workspace.load_config())
        client.start()
        print(client.pid, flush=True)
        while True:
            if any(isinstance(e, protocol.Ready) for e in client.poll()):
                print("ready", flush=True)
            time.sleep(0.05)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"  # the engine is up, model loaded
        assert pid_running(engine_pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while pid_running(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_running(engine_pid)
    finally:
        parent.kill()


def test_the_apps_config_and_run_requests_cross_to_the_engine_whole():
    # What the app hands the engine (spawn argument and run requests) is pickled: every setting survives.
    cfg = Config()
    cfg.sampling.temperature = 1.5
    cfg.label.keymap = {"tie": "y"}
    request = protocol.StartPPO(cfg, reward_run="reward-1", resume_run=None)
    crossed = pickle.loads(pickle.dumps(request))
    assert crossed == request and crossed.config.to_dict() == cfg.to_dict()
    assert crossed.config.sampling.temperature == 1.5 and crossed.config.label.keymap == {"tie": "y"}
    assert Config().to_dict() != cfg.to_dict()  # not the defaults that happened to match
