"""Data-parallel runs (rlhf/distributed.py): the formulas by hand, then real 2-rank gloo process groups on the CPU.

The 2-rank tests start this file as a script in two processes with the environment `launch` gives its ranks
(`python tests/test_distributed.py OUT DP_WORKSPACE SINGLE_WORKSPACE`): each rank writes what it saw to
OUT/rank-<r>.json. The CLI test starts `rlhf-tui ppo --processes 2` itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.distributed import (SINGLE, launch_environment, loss_share, pooled_mean_var, rank_step_seed,
                              share_bounds, threads_per_process)

ROOT = Path(__file__).resolve().parents[1]


# -- formulas ----------------------------------------------------------------------------------


def test_share_bounds_split_evenly_in_rank_order():
    assert [share_bounds(10, r, 2) for r in range(2)] == [(0, 5), (5, 10)]
    assert [share_bounds(7, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 7)]  # sizes 2, 2, 3
    assert [share_bounds(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]  # a rank may get nothing


def test_loss_share_weights_sum_to_one():
    # 3 of 8 tokens on rank 0, 5 on rank 1: the weighted mean losses add up to the global mean's gradient.
    assert loss_share(3, 8) == 0.375 and loss_share(5, 8) == 0.625
    assert loss_share(0, 0) == 0.0


def test_pooled_mean_var_matches_one_batch():
    # Values 1, 2, 3 on one rank and 4, 6 on the other: S = 16, S2 = 66, n = 5; mean 3.2,
    # var = (66 - 256 / 5) / 4 = 3.7, what the five values give in one place.
    mean, var = pooled_mean_var(16.0, 66.0, 5.0)
    assert mean == pytest.approx(3.2) and var == pytest.approx(3.7)
    assert pooled_mean_var(2.0, 4.0, 1.0) == (2.0, 0.0)


def test_rank_step_seed_differs_by_rank_and_step_and_repeats():
    seeds = {(step, rank): rank_step_seed(0, step, rank) for step in range(3) for rank in range(2)}
    assert len(set(seeds.values())) == 6  # each rank and step its own stream
    assert rank_step_seed(0, 2, 1) == seeds[2, 1]  # a resumed run draws what it would have
    assert all(0 <= seed < 2**64 for seed in seeds.values())  # what torch.manual_seed takes


def test_threads_per_process_and_environment(tmp_path):
    assert threads_per_process(16, 4) == 4 and threads_per_process(2, 4) == 1
    env = launch_environment(1, 2, tmp_path / "rendezvous", 1, 4242)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "127.0.0.1"
    assert env["RLHF_TUI_LAUNCHER_PID"] == "4242"
    assert env["GLOO_SOCKET_IFNAME"] in ("lo", "lo0") and env["OMP_NUM_THREADS"] == "1"


def test_one_process_is_the_identity():
    assert SINGLE.writes and SINGLE.share([1, 2, 3]) == [1, 2, 3]
    assert SINGLE.sum([1.5]) == [1.5] and SINGLE.mean_metrics({"a": 2.0}) == {"a": 2.0}
    assert not SINGLE.any(False) and SINGLE.from_rank0("run") == "run"
    assert SINGLE.masked_moments(None, None) is None  # masked_whiten measures them itself


def test_masked_whiten_with_pooled_moments_is_one_batch_whitening():
    import torch

    from rlhf.ppo_math import masked_whiten

    x, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 0.0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    pooled = masked_whiten(x, mask, moments=pooled_mean_var(16.0, 66.0, 5.0))
    assert torch.allclose(pooled, masked_whiten(x, mask))
    assert pooled[0, 0].item() == pytest.approx((1 - 3.2) / math.sqrt(3.7 + 1e-8), rel=1e-6)


# -- two ranks ---------------------------------------------------------------------------------


def run_ranks(out: Path, *args: str, timeout: float = 300) -> list[dict]:
    """Run this file as rank 0 and rank 1 of a 2-process gloo group; each rank's JSON report."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, str(out), *args],
                              env={**env, **launch_environment(rank, 2, out / "rendezvous", 1, os.getpid())},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(logs)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir) -> tuple[list[dict], Path]:
    """One 2-rank launch for the whole module (starting the ranks costs most of it): the collectives, then reward
    training and PPO on two ranks and in one process. Each rank's report, and the folder of the workspaces."""
    from tools.tiny import exclamation_rule_workspace

    root = tmp_path_factory.mktemp("two-ranks")
    exclamation_rule_workspace(root / "dp", tiny_model_dir)
    exclamation_rule_workspace(root / "single", tiny_model_dir)
    return run_ranks(root / "out", str(root / "dp"), str(root / "single")), root


@pytest.mark.slow  # starts processes that train the tiny model
def test_collectives_on_two_ranks(two_ranks):
    for rank, report in enumerate(report["collectives"] for report in two_ranks[0]):
        assert report["rank"] == rank and report["world"] == 2 and report["writes"] == (rank == 0)
        assert report["sum"] == [1.0, 3.0]  # ranks 0 and 1 sent [rank, 1 + rank]
        assert report["any"] is True and report["none"] is False
        assert report["from_rank0"] == "run-of-rank-0"
        # metrics: score averaged, tokens_per_s summed, a NaN left out of the mean
        assert report["metrics"] == {"score": 1.5, "tokens_per_s": 30.0, "only_rank1": 7.0}
        # gradients: rank 0 holds [2, 2] with weight 3/8, rank 1 [10, 0] with weight 5/8
        assert report["grad"] == pytest.approx([0.75 + 6.25, 0.75])
        assert report["broadcast"] == [0.0, 0.0]  # rank 0's values everywhere
        # masked moments of 1, 2, 3 (rank 0) and 4, 6 (rank 1): as test_pooled_mean_var_matches_one_batch
        assert report["moments"] == pytest.approx([3.2, 3.7])
        assert report["gathered"] == [0.0, 1.0, 1.0]
        assert report["identical_ok"] and "weights differ" in report["identical_error"]
        # nothing listens beyond the loopback interface
        assert report["listening"] and all(ip in ("127.0.0.1", "::1") for ip in report["listening"])
    assert two_ranks[0][0]["peer_lost"].startswith("rank 0: another process of this data-parallel run ended")


def test_fsdp_and_deepspeed_launches_are_refused(monkeypatch):
    from rlhf.distributed import current_ranks
    from rlhf.errors import RlhfError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(flag, "true")
        with pytest.raises(RlhfError, match=f"^{name} is not supported: .*docs/scale-out.md"):
            current_ranks()
        monkeypatch.delenv(flag)


def _collectives(ranks) -> dict:
    import psutil
    import torch

    r = ranks.rank
    grad_param = torch.nn.Parameter(torch.zeros(2))
    grad_param.grad = torch.tensor([2.0, 2.0]) if r == 0 else torch.tensor([10.0, 0.0])
    ranks.sum_gradients([grad_param], loss_share(3 if r == 0 else 5, 8))
    broadcast = torch.nn.Parameter(torch.full((2,), float(r)))
    ranks.broadcast_parameters([broadcast])
    values = torch.tensor([1.0, 2.0, 3.0, 0.0]) if r == 0 else torch.tensor([4.0, 6.0, 9.0, 9.0])
    mask = torch.tensor([1, 1, 1, 0]) if r == 0 else torch.tensor([1, 1, 0, 0])
    same = torch.nn.Parameter(torch.ones(3))
    ranks.check_identical([same])
    try:
        ranks.check_identical([torch.nn.Parameter(torch.full((3,), float(r)))])
        error = ""
    except RuntimeError as exc:
        error = str(exc)
    metrics = {"score": float(1 + r), "tokens_per_s": 10.0 + 10 * r, "only_rank1": math.nan if r == 0 else 7.0}
    report = {
        "rank": ranks.rank, "world": ranks.world, "writes": ranks.writes,
        "sum": ranks.sum([float(r), 1.0 + r]), "any": ranks.any(r == 1), "none": ranks.any(False),
        "from_rank0": ranks.from_rank0(f"run-of-rank-{r}"), "metrics": ranks.mean_metrics(metrics),
        "grad": grad_param.grad.tolist(), "broadcast": broadcast.tolist(),
        "moments": list(ranks.masked_moments(values, mask)),
        "gathered": ranks.gather(torch.full((r + 1,), float(r))).tolist(),
        "identical_ok": True, "identical_error": error,
        "listening": [c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN],
    }
    ranks.barrier()
    return report


# -- reward training and PPO on two ranks vs one process -------------------------------------

# 120 training pairs in 10 steps; the last batch holds 3 pairs (1 on rank 0, 2 on rank 1): the gradient weights
# must make up for the uneven shares.
REWARD_SETTINGS = {"reward.epochs": 1, "reward.batch_size": 13, "reward.checkpoint_every": 4}
PPO_SETTINGS = {"ppo.batch_size": 4, "ppo.max_new_tokens": 8, "ppo.minibatches": 1, "ppo.ppo_epochs": 2,
                "ppo.lr": 1e-3, "ppo.max_policy_kl_per_step": 0.0, "ppo.no_eos_penalty": 0.0}
PPO_STEPS = 2
# Two ranks add up gradients in another order than one process: float32 rounding, nothing more. Bounds on the
# relative difference of the reward losses, of PPO's metrics (averaged over ranks: token means over each rank's
# share), and on the largest difference of a trained weight (measured: 0, 3e-5, 3e-7).
REWARD_LOSS_TOL = 1e-6
PPO_METRIC_TOL = 1e-4
PARAM_TOL = 1e-6


@pytest.mark.slow  # starts processes that train the tiny model
def test_reward_and_ppo_on_two_ranks_match_one_process(two_ranks):
    from safetensors.torch import load_file

    from rlhf.store import Store

    (first, second), tmp_path = [report["runs"] for report in two_ranks[0]], two_ranks[1]
    out = tmp_path / "out"
    # Reward training: one run, written by rank 0 alone, with the losses of one process on the same batches.
    run_id = first["reward_runs"][0]
    assert second["reward_runs"][0] == run_id and second["reward_loss"] == []  # rank 1 read no rows of its own
    assert len(first["reward_loss"]) == 10
    assert first["reward_loss"] == pytest.approx(second["reward_loss_single"], rel=REWARD_LOSS_TOL)
    with Store(tmp_path / "dp" / "rlhf.db") as store:
        assert [(run.id, run.status, run.config["processes"]) for run in store.runs()] == [
            (run_id, "finished", 2)]
    heads = [load_file(tmp_path / root / "runs" / report["reward_runs"][-1] / "reward" / "score_head.safetensors")
             for report, root in ((first, "dp"), (second, "single"))]
    assert (heads[0]["weight"] - heads[1]["weight"]).abs().max().item() <= PARAM_TOL
    # PPO: both ranks log the global batch's metrics, those of one process stepping on the whole rollout.
    for name in ("policy_loss", "value_loss", "approx_kl", "score_mean", "kl_k1", "entropy", "response_length"):
        ranks_values = [step[name] for step in first["ppo"]]
        assert [step[name] for step in second["ppo"]] == ranks_values, name
        single = [step[name] for step in first["ppo_single"]]
        assert ranks_values == pytest.approx(single, rel=PPO_METRIC_TOL, abs=1e-6), name
    assert first["ppo_sums_ranks"] == second["ppo_sums_ranks"]  # the same weights on both ranks (LoRA, value head)
    trained = load_file(out / "ppo-ranks.safetensors"), load_file(out / "ppo-single.safetensors")
    assert max((trained[0][k] - trained[1][k]).abs().max().item() for k in trained[0]) <= PARAM_TOL


@pytest.mark.slow  # starts processes that train the tiny model
def test_train_reward_processes_matches_one_process(two_ranks, tmp_path):
    """`rlhf-tui train-reward --processes 2` trains what one process trained on the same pairs, says so once."""
    import shutil

    from rlhf.store import Store

    ws = tmp_path / "ws"
    shutil.copytree(two_ranks[1] / "single", ws)  # rank 1 trained a reward model here in one process
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "--workspace", str(ws), "train-reward", "--processes",
                           "2", "--epochs", "1", "--batch-size", "13"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    with Store(ws / "rlhf.db") as store:
        single, ranks = store.runs("reward")
        losses = [row["value"] for row in store.metrics(ranks.id, "loss")]
    assert ranks.status == "finished" and ranks.config["processes"] == 2 and single.config["processes"] == 1
    assert done.stdout.count("reward run") == 1 and f"reward run {ranks.id}: finished 1 epoch (10 steps)" in done.stdout
    assert losses == pytest.approx(two_ranks[0][1]["runs"]["reward_loss_single"], rel=REWARD_LOSS_TOL)


@pytest.mark.slow  # starts processes that train the tiny model
def test_ppo_processes_stop_on_one_rank_and_resume(two_ranks, tmp_path):
    """`rlhf-tui ppo --processes 2` on the workspace the ranks trained a reward model in: SIGTERM to rank 1 alone
    stops both ranks after the same step, with a checkpoint; so does killing the launcher outright (SIGKILL: it
    can pass nothing on); `--resume RUN --processes 2` finishes the run."""
    import shutil
    import signal

    import psutil

    from rlhf.store import Store

    ws = tmp_path / "ws"
    shutil.copytree(two_ranks[1] / "dp", ws)
    with (ws / "rlhf.toml").open("a", encoding="utf-8") as toml:
        toml.write("[ppo]\nmax_new_tokens = 8\ncheckpoint_every = 1\n")
    command = [sys.executable, "-m", "rlhf.cli", "--workspace", str(ws), "ppo"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    steps = 30  # a stop seen during the last step would let the run finish: leave room after the signal
    launcher = subprocess.Popen([*command, "--processes", "2", "--steps", str(steps), "--batch-size", "4",
                                 "--epochs", "1", "--minibatches", "1"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def ppo_run():
        with Store(ws / "rlhf.db") as store:
            return next(iter(store.runs("ppo")), None)

    def wait_for_step(launched: subprocess.Popen, step: int) -> None:
        deadline = time.monotonic() + 240
        while (run := ppo_run()) is None or run.step < step:
            assert launched.poll() is None and time.monotonic() < deadline, launched.communicate()
            time.sleep(0.2)

    wait_for_step(launcher, 1)
    rank1 = next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=240)
    assert launcher.returncode in (130, 143), err
    run = ppo_run()
    assert run.status == "stopped" and 1 <= run.checkpoint_step == run.step < steps, err
    assert run.config["processes"] == 2 and run.pid != rank1.pid
    assert f"ppo run {run.id}: stopped at step {run.step}/{steps}" in out  # said once, by rank 0
    assert out.count("ppo run") == 1

    resume = [*command, "--resume", run.id, "--processes", "2"]
    launcher = subprocess.Popen(resume, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(launcher, run.step + 1)
    ranks = psutil.Process(launcher.pid).children()
    launcher.kill()
    out, err = launcher.communicate(timeout=240)  # the ranks hold its pipes until they end
    assert not [rank for rank in ranks if rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE]
    killed_at = ppo_run()
    assert killed_at.status == "stopped" and run.step < killed_at.checkpoint_step == killed_at.step < steps, err
    assert f"ppo run {run.id}: stopped at step {killed_at.step}/{steps}" in out

    resumed = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    with Store(ws / "rlhf.db") as store:
        run = store.run(run.id)
        kl_rows = store.metrics(run.id, "kl_k1")
    assert run.status == "finished" and run.step == steps
    assert [row["step"] for row in kl_rows] == list(range(1, steps + 1))  # one writer: one row per step


def _worker(out: Path, dp_root: str, single_root: str) -> None:
    """Rank `RANK`'s part of `two_ranks`: its report in OUT/rank-<r>.json."""
    from rlhf.distributed import PeerLost, current_ranks

    ranks = current_ranks()
    report = {"collectives": _collectives(ranks), "runs": _runs(ranks, out, dp_root, single_root)}
    if not ranks.writes:  # rank 1 leaves; rank 0's next collective fails as one line
        (out / f"rank-{ranks.rank}.json").write_text(json.dumps(report))
        os._exit(0)
    try:
        ranks.sum([1.0])
    except PeerLost as exc:
        report["peer_lost"] = str(exc)
    (out / f"rank-{ranks.rank}.json").write_text(json.dumps(report))


def _runs(ranks, out: Path, dp_root: str, single_root: str) -> dict:
    """Reward training through `train_reward` on both ranks, then PPO steps on one global rollout sampled alike on
    both ranks (each rank steps on its rows); then both again in one process each."""
    import torch
    from safetensors.torch import save_file

    from rlhf.config import Workspace
    from rlhf.distributed import SINGLE
    from rlhf.ppo import prepare_prompts
    from rlhf.ppo_trainer import build_trainer
    from rlhf.reward import train_reward
    from rlhf.store import Store

    report: dict = {"rank": ranks.rank, "seconds": {"start": time.monotonic() - STARTED}}

    def reward_run(root: str, on) -> list[float]:
        ws = Workspace(Path(root))
        result = train_reward(ws, ws.load_config().override(REWARD_SETTINGS), ranks=on)
        on.barrier()  # rank 0 has saved the reward model (as `rlhf-tui train-reward` waits)
        assert result.status == "finished", result.message
        report.setdefault("reward_runs", []).append(result.run_id)
        if not on.writes:
            return []
        with Store(ws.db_path) as store:
            return [row["value"] for row in store.metrics(result.run_id, "loss")]

    def ppo_steps(on, tag: str) -> list[dict]:
        ws = Workspace(Path(dp_root))
        cfg = ws.load_config().override(PPO_SETTINGS)
        trainer = build_trainer(ws, cfg, report["reward_runs"][0], ranks=on)
        with Store(ws.db_path) as store:
            prompts, _ = prepare_prompts(store.prompts(), trainer.tokenizer, cfg.model.max_prompt_tokens)
        generate, steps = trainer.rollout, []
        for step in range(PPO_STEPS):
            batch = prompts[step * 4:(step + 1) * 4]
            torch.manual_seed(100 + step)
            whole = generate(batch)  # the same responses on every rank: same weights, same seed
            start, end = share_bounds(len(batch), on.rank, on.world)
            trainer.rollout = lambda _prompts, rows=slice(start, end): _rows(whole, rows)
            metrics, _ = trainer.step(batch[start:end])
            steps.append(metrics)
        report[f"ppo_sums_{tag}"] = [p.detach().double().sum().item() for p in trainer.params]
        if on.writes:
            save_file({f"p{i}": p.detach().contiguous() for i, p in enumerate(trainer.params)},
                      out / f"ppo-{tag}.safetensors")
        return steps

    def timed(name: str, value):
        report["seconds"][name] = round(time.monotonic() - STARTED - sum(report["seconds"].values()), 2)
        return value

    report["reward_loss"] = timed("reward", reward_run(dp_root, ranks))
    report["ppo"] = timed("ppo", ppo_steps(ranks, "ranks"))
    if ranks.writes:  # the same in one process: PPO on rank 0, reward training on rank 1 (at the same time)
        report["ppo_single"] = timed("ppo_single", ppo_steps(SINGLE, "single"))
    else:
        report["reward_loss_single"] = timed("reward_single", reward_run(single_root, SINGLE))
    return report


def _rows(rollout, rows: slice):
    """The rollout's responses `rows` (a rank's share), as if sampled alone."""
    from dataclasses import fields, replace

    import torch

    return replace(rollout, **{f.name: getattr(rollout, f.name)[rows] for f in fields(rollout)
                               if isinstance(getattr(rollout, f.name), (torch.Tensor, list))})


if __name__ == "__main__":
    STARTED = time.monotonic()
    _worker(Path(sys.argv[1]), *sys.argv[2:])
