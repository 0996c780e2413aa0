"""Data-parallel runs: the same reward or PPO loop in N processes on one machine, each on its share of every
batch, gradients summed through Accelerate's process group (gloo on CPU, NCCL on GPUs).

Started by `rlhf-tui ppo|train-reward --processes N` (`launch`: N local processes meeting through a file, every
socket on the loopback interface), or by `accelerate launch` / torchrun (`current_ranks` reads their
environment; their rendezvous store listens on all interfaces: docs/scale-out.md).

What each rank does:
- every rank loads the same base and LoRA (from the same seed, then rank 0's copy is broadcast), so all start
  equal; each step a rank works on `Ranks.share` of the global batch (whole prompts, with all their samples);
- after its backward pass each rank's gradient is weighted by its share of the loss's normaliser (pairs,
  tokens or responses) and the weighted gradients are summed (`Ranks.sum_gradients`): every rank then holds
  the gradient of the global batch's mean loss and takes the same optimizer step, so the parameters stay
  identical without being sent again (checked on checksums after every step: `Ranks.check_identical`);
- what decides control flow is agreed on: a stop asked on any rank stops every rank after the same step
  (`Ranks.any`), metrics (and so the KL controller) are the global batch's (`Ranks.mean_metrics`);
- only rank 0 writes: run rows, metrics, samples, checkpoints, the saved model (`Ranks.writes`).
One process is `SINGLE`: every method is the identity there and imports nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import RlhfError
from .hooks import RunHooks

if TYPE_CHECKING:
    from torch import Tensor, nn

T = TypeVar("T")

RENDEZVOUS_ENV = "RLHF_TUI_RENDEZVOUS"  # set by `launch`: the file the ranks meet through (no TCP store)
LAUNCHER_ENV = "RLHF_TUI_LAUNCHER_PID"  # set by `launch`: its process id (a rank stops when it dies)
# Metrics that add up over ranks (each rank's throughput); every other metric is averaged.
SUMMED_METRICS = frozenset({"tokens_per_s"})
# How long a rank waits for the others at a collective before failing (rank 0 alone evaluates held-out pairs
# and writes checkpoints while the others wait).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long `launch` lets the other ranks end on their own after one failed, before it kills them.
PEER_FAILURE_GRACE_S = 30.0


# -- formulas ----------------------------------------------------------------------------------


def share_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous block [start, end) of `count` items split over `world` ranks as evenly as
    possible: start = count * rank // world (sizes differ by at most one; a rank may get none)."""
    return count * rank // world, count * (rank + 1) // world


def loss_share(local: float, total: float) -> float:
    """A rank's weight on its gradient, local / total: its part of the global mean loss's normaliser (pairs,
    tokens or responses). The weighted gradients summed over ranks are the gradient of the global mean."""
    return local / total if total else 0.0


def pooled_mean_var(total: float, total_sq: float, count: float) -> tuple[float, float]:
    """Mean and unbiased variance from the sums over every rank: mean = S / n,
    var = (S2 - S^2 / n) / (n - 1) (0 for a single value), as `ppo_math.masked_var` over one batch."""
    mean = total / count
    return mean, max(total_sq - total * total / count, 0.0) / max(count - 1, 1)


def rank_step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of rank `rank` before step `step + 1`: a hash of (seed, step, rank), so the ranks draw
    different samples and a resumed run draws what it would have without the stop."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "big")


def launch_environment(rank: int, world: int, rendezvous: Path, threads: int, launcher_pid: int) -> dict[str, str]:
    """The environment variables of rank `rank` of `world` local processes started by `launch` (process
    `launcher_pid`): ranks, the rendezvous file, the loopback interface for gloo and NCCL sockets, CPU threads
    per process."""
    loopback = loopback_interface()
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            RENDEZVOUS_ENV: str(rendezvous), LAUNCHER_ENV: str(launcher_pid), "MASTER_ADDR": "127.0.0.1",
            "GLOO_SOCKET_IFNAME": loopback, "NCCL_SOCKET_IFNAME": loopback, "OMP_NUM_THREADS": str(threads)}


def threads_per_process(cpus: int, processes: int) -> int:
    """CPU threads each of `processes` ranks gets: an even share of the cores, at least one."""
    return max(cpus // processes, 1)


def loopback_interface() -> str:
    """The loopback network interface's name (lo on Linux, lo0 on macOS and the BSDs)."""
    names = {name for _, name in socket.if_nameindex()}
    return "lo" if "lo" in names or "lo0" not in names else "lo0"


# -- ranks -------------------------------------------------------------------------------------


class PeerLost(RlhfError):
    """Another rank of the run ended (an error, out of memory, killed) while this one waited for it at a
    collective: this rank cannot go on either."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a data-parallel run, and the collectives the loops use.

    With one process (`SINGLE`) every method returns its input: the loops call them unconditionally."""

    rank: int = 0
    world: int = 1

    @property
    def writes(self) -> bool:
        """Whether this process writes run rows, metrics, samples, checkpoints and models: rank 0 only."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous block of a global batch (`share_bounds`)."""
        start, end = share_bounds(len(items), self.rank, self.world)
        return list(items[start:end])

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (one all-reduce for the list)."""
        return self._reduce(values, "sum")

    def max(self, values: list[float]) -> list[float]:
        """Each value's maximum over the ranks (one all-reduce for the list)."""
        return self._reduce(values, "max")

    def _reduce(self, values: list[float], reduction: str) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch
        from accelerate.utils import reduce

        with self._peers():
            return reduce(torch.tensor(values, dtype=torch.float64, device=_device()), reduction=reduction).tolist()

    @contextmanager
    def _peers(self) -> Iterator[None]:
        """Around a collective: a rank that ended (failed, killed) makes it fail here too, as one line."""
        try:
            yield
        except RuntimeError as exc:  # gloo and NCCL say "Connection closed by peer" and the like
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PeerLost(f"rank {self.rank}: another process of this data-parallel run ended, see its error "
                           f"({first})") from None

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: how the ranks agree to stop after the same step."""
        return self.max([float(flag)])[0] > 0

    def seed_step(self, seed: int, step: int) -> None:
        """Seed torch's random numbers for the step after `step` with `rank_step_seed` (several ranks only; one
        process keeps its one stream, saved in its checkpoints)."""
        if self.world > 1:
            import torch

            torch.manual_seed(rank_step_seed(seed, step, self.rank))

    def from_rank0(self, value: T) -> T:
        """Rank 0's `value` (any picklable object, such as a new run's id) on every rank."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        with self._peers():
            return broadcast_object_list([value], from_process=0)[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            from accelerate import PartialState

            with self._peers():
                PartialState().wait_for_everyone()

    def gather(self, rows: Tensor) -> Tensor:
        """Every rank's `rows` (a tensor of any length along dim 0), concatenated in rank order, on every rank."""
        if self.world == 1:
            return rows
        import torch
        from accelerate.utils import gather_object

        with self._peers():
            return torch.cat(gather_object([rows.detach().cpu()])).to(rows.device)

    def check_identical(self, params: list[nn.Parameter]) -> None:
        """Raise when `params` differ between ranks (checked on checksums, at each checkpoint): the ranks
        must hold the same weights after every step, or the run is wrong whatever rank 0 saves."""
        if self.world == 1:
            return
        total = sum(p.detach().double().sum().item() for p in params)
        squares = sum((p.detach().double() ** 2).sum().item() for p in params)
        high = self.max([total, squares, -total, -squares])
        if high[0] != -high[2] or high[1] != -high[3]:
            raise RuntimeError(f"rank {self.rank}: the ranks' weights differ (checksums {total!r}, {squares!r}): "
                               "the data-parallel gradient sum went wrong")

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The global batch's metrics from each rank's: averaged over ranks (their shares are equal), except
        `SUMMED_METRICS`; a metric a rank lacks (NaN there) is averaged over the ranks that have it."""
        if self.world == 1:
            return dict(metrics)
        names = sorted(metrics)
        present = [0.0 if math.isnan(metrics[name]) else 1.0 for name in names]
        values = [0.0 if math.isnan(metrics[name]) else metrics[name] for name in names]
        totals = self.sum(values + present)
        sums, counts = totals[:len(names)], totals[len(names):]
        return {name: total if name in SUMMED_METRICS else total / count
                for name, total, count in zip(names, sums, counts) if count}

    def sum_gradients(self, params: list[nn.Parameter], weight: float) -> None:
        """Replace each parameter's gradient by the sum over ranks of weight * gradient (`loss_share`), in one
        all-reduce of a flat buffer; a parameter without a gradient on this rank counts as zeros."""
        if self.world == 1:
            return
        import torch
        from accelerate.utils import reduce

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() * weight
                          for p in params])
        with self._peers():
            flat = reduce(flat, reduction="sum")
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def broadcast_parameters(self, params: list[nn.Parameter]) -> None:
        """Copy rank 0's values of `params` to every rank (the same seed already makes them equal on one
        device type; this makes it so whatever the kernels do)."""
        if self.world == 1:
            return
        import torch
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                with self._peers():
                    p.copy_(broadcast(p.detach().clone(), from_process=0))

    def masked_moments(self, x: Tensor, mask: Tensor) -> tuple[float, float] | None:
        """Mean and unbiased variance of `x` over the real tokens of every rank's share (`pooled_mean_var`), for
        `ppo_math.masked_whiten`; None in one process, where it measures them itself."""
        if self.world == 1:
            return None
        real = x[mask.bool()].double()
        total, total_sq, count = self.sum([real.sum().item(), (real**2).sum().item(), float(real.numel())])
        return pooled_mean_var(total, total_sq, count)


SINGLE = Ranks()


class AgreedStop:
    """`hooks` with its `should_stop` agreed by every rank: true everywhere once any rank was asked to stop (Ctrl+C
    or SIGTERM on one rank stops them all after the same step). The loops poll it the same number of times on
    every rank, so each poll is one collective; everything else is `hooks`'s own."""

    def __init__(self, hooks: RunHooks, ranks: Ranks) -> None:
        self.hooks, self.ranks = hooks, ranks

    def should_stop(self) -> bool:
        return self.ranks.any(self.hooks.should_stop())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hooks, name)


def agreed_hooks(hooks: RunHooks, ranks: Ranks) -> RunHooks:
    """`hooks` for a run on `ranks`: themselves in one process, else an `AgreedStop` around them."""
    return hooks if ranks.world == 1 else AgreedStop(hooks, ranks)  # type: ignore[return-value]


@contextmanager
def rank0_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block before the other ranks start it (opening the workspace: a schema migration, runs
    left running marked interrupted), so the ranks never race on it."""
    if not ranks.writes:
        ranks.barrier()
    yield
    if ranks.writes:
        ranks.barrier()


def silence_stdout_unless_writing(ranks: Ranks) -> None:
    """Send a rank > 0's stdout to /dev/null: rank 0 prints the run's summary once (errors stay on stderr)."""
    if not ranks.writes:
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _device() -> Any:
    from accelerate import PartialState

    return PartialState().device


def is_rank() -> bool:
    """Whether this process is one of several ranks (started by `launch`, `accelerate launch` or torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def current_ranks() -> Ranks:
    """This process's `Ranks`: `SINGLE` unless started as one of several (WORLD_SIZE > 1, by `launch`,
    `accelerate launch` or torchrun), then joins the process group first. FSDP and DeepSpeed launches are
    refused: these loops hold the whole model on each rank (docs/scale-out.md)."""
    if not is_rank():
        return SINGLE
    world = int(os.environ["WORLD_SIZE"])
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "false").lower() == "true":
            raise RlhfError(f"{name} is not supported: rlhf-tui's reward and PPO loops run data-parallel (each "
                            "process holds the whole model); launch without FSDP/DeepSpeed, or export the run "
                            "with `rlhf-tui export-bundle` for an engine that shards (docs/scale-out.md)")
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    if LAUNCHER_ENV in os.environ:
        stop_when_launcher_dies(int(os.environ[LAUNCHER_ENV]))
    rank, gpu = int(os.environ["RANK"]), torch.cuda.is_available()
    rendezvous = os.environ.get(RENDEZVOUS_ENV)
    if rendezvous and not dist.is_initialized():
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        dist.init_process_group("nccl" if gpu else "gloo", init_method=Path(rendezvous).as_uri(), rank=rank,
                                world_size=world, timeout=COLLECTIVE_TIMEOUT)
    state = PartialState(cpu=not gpu, timeout=COLLECTIVE_TIMEOUT)
    return Ranks(state.process_index, state.num_processes)


def stop_when_launcher_dies(launcher_pid: int) -> None:
    """On Linux, have the kernel send this rank SIGTERM when the `launch` process that started it dies: a
    launcher killed with SIGKILL (or by the OOM killer) can pass nothing on, and its ranks, in sessions of their
    own, would train on unwatched. SIGTERM stops each after its step with a checkpoint, as a forwarded one does.
    Elsewhere the ranks outlive such a launcher (docs/scale-out.md)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != launcher_pid:  # it died before the kernel was told
        os.kill(os.getpid(), signal.SIGTERM)


# -- launcher ----------------------------------------------------------------------------------


def launch(argv: list[str], processes: int) -> int:
    """Run `rlhf-tui ARGV` in `processes` local processes (ranks 0..N-1) and return rank 0's exit code (a
    failed rank's, when one failed).

    The ranks meet through a file in a private temporary folder and talk over the loopback interface only:
    nothing listens beyond 127.0.0.1. They run in sessions of their own, away from the terminal: Ctrl+C, SIGTERM
    and SIGHUP reach this launcher, which passes each on to every rank once (each rank then stops after the
    step, or aborts on the second, as a single run does). When a rank fails the others get PEER_FAILURE_GRACE_S
    to end (their next collective fails) before they are killed."""
    gpus = _gpu_count()
    if gpus and processes > gpus:
        raise RlhfError(f"--processes {processes}: this machine has {gpus} GPU{'s' if gpus > 1 else ''}; run at "
                        "most one process per GPU")
    threads = threads_per_process(os.cpu_count() or 1, processes)
    children: list[subprocess.Popen] = []

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Installed before the first rank starts: from then on no stop signal can end the launcher without them.
    stop_signals = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s]
    previous = {signum: signal.signal(signum, forward) for signum in stop_signals}
    with tempfile.TemporaryDirectory(prefix="rlhf-tui-ranks-") as folder:
        rendezvous = Path(folder) / "rendezvous"
        try:
            for rank in range(processes):
                children.append(subprocess.Popen(
                    [sys.executable, "-m", "rlhf.cli", *argv], start_new_session=True,
                    env={**os.environ, **launch_environment(rank, processes, rendezvous, threads, os.getpid())}))
            return _wait_for_ranks(children)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _gpu_count() -> int:
    """CUDA devices this process sees (loads torch; the launcher needs nothing else of it)."""
    import torch

    return torch.cuda.device_count()


def _wait_for_ranks(children: list[subprocess.Popen]) -> int:
    """Wait for every rank; once one has failed, kill those still running after PEER_FAILURE_GRACE_S."""
    failed_at = None
    while any(child.poll() is None for child in children):
        codes = [child.returncode for child in children if child.returncode is not None]
        if failed_at is None and any(code not in STOPPED_CODES for code in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > PEER_FAILURE_GRACE_S:
            for child in children:
                if child.poll() is None:
                    child.kill()
        time.sleep(0.1)
    codes = [child.returncode for child in children]
    return next((code for code in codes if code not in STOPPED_CODES), codes[0])


# Exit codes of a rank that ended well: finished, or stopped by a signal (128 + SIGINT, SIGTERM, SIGHUP).
STOPPED_CODES = frozenset({0, 130, 143, 129})
