"""Data-parallel runs (rlhf/distributed.py): the formulas by hand, then real 2-rank gloo process groups on the CPU.

The 2-rank tests start this file as a script in two processes with the environment `launch` gives its ranks
(`python tests/test_distributed.py MODE OUT`): each rank writes what it saw to OUT/rank-<r>.json.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.distributed import (SINGLE, launch_environment, loss_share, pooled_mean_var, share_bounds,
                              threads_per_process)

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


def test_threads_per_process_and_environment(tmp_path):
    assert threads_per_process(16, 4) == 4 and threads_per_process(2, 4) == 1
    env = launch_environment(1, 2, tmp_path / "rendezvous", 1)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "127.0.0.1"
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


def run_ranks(mode: str, out: Path, *args: str, timeout: float = 120) -> list[dict]:
    """Run this file as rank 0 and rank 1 of a 2-process gloo group; each rank's JSON report."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(out), *args],
                              env={**env, **launch_environment(rank, 2, out / "rendezvous", 1)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(logs)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]


def test_collectives_on_two_ranks(tmp_path):
    first, second = run_ranks("collectives", tmp_path)
    for rank, report in enumerate((first, second)):
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


def _collectives(out: Path) -> None:
    import psutil
    import torch

    from rlhf.distributed import current_ranks

    ranks = current_ranks()
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
    (out / f"rank-{r}.json").write_text(json.dumps(report))


MODES = {"collectives": _collectives}

if __name__ == "__main__":
    MODES[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
