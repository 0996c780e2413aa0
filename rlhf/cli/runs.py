"""The run commands: `train-reward` and `ppo` (the same `StartReward` / `StartPPO` records the app sends its
engine, run through `run_requests.run_request` with a progress bar, Ctrl+C / SIGTERM / SIGHUP stopping after the
step), `score`, `export-reward`, `export-bundle`, `runs` and `runs show`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from ..config import ALGORITHMS, KL_CONTROLLERS, Config
from ..distributed import agreed_hooks, current_ranks, is_rank, launch, rank0_first, silence_stdout_unless_writing
from ..errors import RlhfError, RunCancelled
from ..hooks import RunHooks, RunResult
from ..run_requests import RunRequest, StartPPO, StartReward, run_request
from ..store import Store
from .common import (PROG, add_command, add_model_option, add_quantization_option, enter_demo_mode, open_workspace,
                     plural, print_json)


CLEAR_LINE = "\r\033[K"


class ConsoleProgress(RunHooks):
    """A training run's progress on stderr: a bar redrawn on each step on a terminal; off a terminal,
    one line each time the last of the `shown` metrics is reported (e.g. per evaluation)."""

    def __init__(self, shown: tuple[str, ...]) -> None:
        super().__init__()
        self.shown = shown
        self.latest: dict[str, float] = {}
        self.total = 0
        self.started = self.steps_started = time.monotonic()
        self.start_step = 0
        self.tty = sys.stderr.isatty()

    def on_start(self, run_id: str, kind: str, total_steps: int, start_step: int = 0) -> None:
        self.total = total_steps
        self.start_step, self.steps_started = start_step, time.monotonic()
        resumed = f" (resuming at step {start_step})" if start_step else ""
        print(f"{kind} run {run_id}: {total_steps} steps{resumed}", file=sys.stderr)

    def on_step(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        self.latest.update(metrics)
        values = "  ".join(f"{name} {self.latest[name]:.3f}" for name in self.shown if name in self.latest)
        done = step / self.total if self.total else 0.0
        bar = "#" * round(20 * done) + "-" * (20 - round(20 * done))
        per_step = (time.monotonic() - self.steps_started) / max(step - self.start_step, 1)
        line = f"[{bar}] {step}/{self.total}  {time.monotonic() - self.started:.0f}s  {per_step:.2f} s/step  {values}"
        if self.tty:
            print(f"{CLEAR_LINE}{line}", end="", file=sys.stderr, flush=True)
        elif self.shown and self.shown[-1] in metrics:  # off a terminal: a line when the last metric comes
            print(line, file=sys.stderr)

    def on_warning(self, run_id: str, message: str) -> None:
        print(f"{CLEAR_LINE if self.tty else ''}warning: {message}", file=sys.stderr)

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


# Ctrl+C, `kill`, and a closed terminal or dropped SSH session (SIGHUP): each stops a run with a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_on_ctrl_c(hooks: RunHooks, announce: bool = True) -> Iterator[list[int]]:
    """The first Ctrl+C, SIGTERM or SIGHUP asks the run to stop after its current step (keeping a checkpoint);
    a second of the same aborts. Yields the signals received, so a command can exit 128 + signal (130, 143, 129).
    `announce`: say so on stderr (rank 0 of a data-parallel run speaks for all).

    After a SIGHUP the terminal is gone: a write to it would raise (EIO) and kill the run before its checkpoint,
    so stdout and stderr are sent to /dev/null from then on; the run's outcome is in `rlhf-tui runs`."""
    received: list[int] = []

    def request_stop(signum: int, frame: Any) -> None:
        received.append(signum)
        hooks.stop_requested.set()
        if signum == signal.SIGHUP:
            _detach_from_terminal()
        elif announce:
            print("\nstopping after this step (Ctrl+C again to abort)", file=sys.stderr)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _detach_from_terminal() -> None:
    """Point stdout and stderr at /dev/null (after the terminal hung up, writing to it fails)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
        os.dup2(devnull, stream.fileno())
    os.close(devnull)


def stopped_exit_code(received: list[int]) -> int:
    """Exit code of a run stopped by a signal, the shell's way: 128 + its number (130 Ctrl+C, 143 SIGTERM,
    129 SIGHUP)."""
    return 128 + (received[0] if received else signal.SIGINT)


def _refuse_settings_on_resume(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    if args.resume and (getattr(args, "reward", None) or hasattr(args, "model") or hasattr(args, "quantization")
                        or any(v is not None for v in overrides.values())):
        raise RlhfError(f"--resume {args.resume} continues the run with the settings it started with: "
                        "drop the other options")


def _run_headless(args: argparse.Namespace, overrides: dict[str, Any], shown: tuple[str, ...],
                  request_for: Callable[[Config], RunRequest]) -> tuple[RunResult, int, list[int]]:
    """Run the request `request_for(config)` builds (the same record the app sends its engine) in the workspace,
    with a progress bar, Ctrl+C, SIGTERM or SIGHUP stopping it after the step; returns how it ended, the run's
    total steps and the signals received."""
    _refuse_settings_on_resume(args, overrides)
    ranks = current_ranks()  # one of several data-parallel processes? (docs/scale-out.md)
    silence_stdout_unless_writing(ranks)
    with ExitStack() as stack:
        with rank0_first(ranks):
            session = stack.enter_context(open_workspace(args, overrides))
        enter_demo_mode(session.config)
        progress = ConsoleProgress(shown)  # on ranks > 0 the run reports nothing to it
        with stop_on_ctrl_c(progress, announce=ranks.writes) as received:
            try:
                result = run_request(session.workspace, request_for(session.config),
                                     agreed_hooks(progress, ranks), session.store, ranks=ranks)
            except RunCancelled as exc:
                exc.exit_code = stopped_exit_code(received)
                raise
            finally:
                progress.finish()
        ranks.barrier()  # rank 0 has written the run's end (row, reward model) before any rank reads it
        total = session.store.run(result.run_id).total_steps
    return result, total, received


def _launch_processes(args: argparse.Namespace) -> int | None:
    """`--processes N` (N > 1) in the process the user started: the command's exit code once it ran in N local
    processes (`distributed.launch`); None to run it here (one process, or this is one of the N)."""
    if args.processes <= 1 or is_rank():
        return None
    return launch(args.command_line, args.processes)


def _cmd_train_reward(args: argparse.Namespace) -> int:
    if (launched := _launch_processes(args)) is not None:
        return launched
    overrides = {"reward.epochs": args.epochs, "reward.lr": args.lr,
                 "reward.quantization": getattr(args, "quantization", None), "model.quantization": None,
                 "reward.batch_size": args.batch_size}
    result, total, received = _run_headless(args, overrides, ("loss", "train_acc", "heldout_acc"),
                                            lambda config: StartReward(config, resume_run=args.resume))
    if result.status == "failed":
        saved = f"; those weights are saved in {result.checkpoint}" if result.checkpoint else ""
        print(f"reward run {result.run_id}: failed: {result.message}{saved}", file=sys.stderr)
        return 1
    print(reward_summary(result, total))
    return 0 if result.status == "finished" else stopped_exit_code(received)


def reward_summary(result: RunResult, total_steps: int) -> str:
    """The one line `train-reward` ends with: how far it got, how good the model is, what it learned from."""
    from ..reward_model import read_reward_meta

    meta = read_reward_meta(Path(result.checkpoint))
    counts, epochs = meta["counts"], meta["config"]["reward"]["epochs"]
    acc = "not measured" if meta["heldout_acc"] is None else f"{meta['heldout_acc']:.3f}"
    if result.status == "finished":
        progress = f"finished {plural(epochs, 'epoch')} ({meta['steps']} steps)"
    else:
        progress = f"stopped at step {meta['steps']}/{total_steps} ({meta['epochs_completed']} of {epochs} epochs)"
    resume = f"; resume with `{PROG} train-reward --resume {result.run_id}`" if result.status == "stopped" else ""
    return (f"reward run {result.run_id}: {progress} in {meta['seconds']:.1f}s; held-out accuracy {acc} on "
            f"{plural(counts['heldout'], 'pair')} ({plural(counts['heldout_prompts'], 'prompt')}); trained on "
            f"{plural(counts['train'], 'pair')} ({counts['ties']} ties, {counts['truncated']} truncated, "
            f"{counts['identical_skipped']} identical skipped); saved {result.checkpoint}{resume}")


def _cmd_score(args: argparse.Namespace) -> int:
    with open_workspace(args, {"model.quantization": None}) as session:
        run_id = session.store.finished_reward_run(args.reward).id
        from ..reward_model import RewardScorer

        scorer = RewardScorer.from_run(session.workspace, run_id, session.config,
                                       quantization=getattr(args, "quantization", None))
        score = scorer.score(args.prompt, args.response)
    print(f"{score:.4f}")
    return 0


def _cmd_export_reward(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        run_id = session.store.finished_reward_run(args.reward).id
        run_dir = session.workspace.run_dir(run_id)
        if not run_dir.is_dir():
            raise RlhfError(f"no run {run_id!r} in {session.workspace.runs_dir} (see `rlhf-tui runs`)")
        from ..reward_model import export_sequence_classifier

        out = export_sequence_classifier(run_dir, Path(args.out))
    print(f"reward run {run_id} exported to {out}: load it with PeftModel.from_pretrained("
          f"AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1), {str(out)!r}); "
          "reward.json there has BASE and the mean/std that standardise its scores")
    return 0


def _cmd_export_bundle(args: argparse.Namespace) -> int:
    from ..bundle import export_bundle

    with open_workspace(args) as session:
        out = export_bundle(session.workspace, session.store, args.engine, args.out, reward_run=args.reward,
                            ppo_run=args.ppo)
    print(f"{args.engine} bundle written to {out}: {out / 'README.md'} says what each file is and how to launch it")
    return 0


# `rlhf-tui ppo` flag -> config key; --resume takes none of them (the run keeps its own settings).
PPO_FLAGS = {"steps": "ppo.steps", "batch_size": "ppo.batch_size", "minibatches": "ppo.minibatches",
             "epochs": "ppo.ppo_epochs", "lr": "ppo.lr", "init_kl": "ppo.init_kl_coef", "target_kl": "ppo.target_kl",
             "kl_controller": "ppo.kl_controller", "sft_adapter": "ppo.sft_adapter", "algorithm": "ppo.algorithm",
             "samples_per_prompt": "ppo.samples_per_prompt"}


def _cmd_ppo(args: argparse.Namespace) -> int:
    if (launched := _launch_processes(args)) is not None:
        return launched
    overrides = {key: getattr(args, flag) for flag, key in PPO_FLAGS.items()}
    result, total, received = _run_headless(
        args, overrides, ("score_mean", "kl_k1", "entropy"),
        lambda config: StartPPO(config, reward_run=args.reward, resume_run=args.resume))
    where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
    if result.status == "failed":
        print(f"ppo run {result.run_id}: failed: {result.message}", file=sys.stderr)
        return 1
    if result.status == "stopped":
        print(f"ppo run {result.run_id}: stopped at step {result.step}/{total}{where}; "
              f"resume with `{PROG} ppo --resume {result.run_id}`")
        return stopped_exit_code(received)
    print(f"ppo run {result.run_id}: finished {total} steps{where}")
    return 0


def _final_metrics(store: Store, run_id: str) -> dict[str, float]:
    """The latest value of each metric a run logged."""
    return {row["name"]: row["value"] for row in store.metrics(run_id)}


# Shown by `rlhf-tui runs` when a run logged them (PPO: score and KL; reward model: held-out accuracy).
RUNS_TABLE_METRICS = ("score_mean", "kl_k1", "heldout_acc")


def _cmd_runs(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        runs = [{**run.to_dict(), "final_metrics": _final_metrics(session.store, run.id)}
                for run in session.store.runs()]
    if args.json:
        print_json(runs)
        return 0
    for run in runs:
        shown = "  ".join(f"{name} {run['final_metrics'][name]:.3f}" for name in RUNS_TABLE_METRICS
                          if run["final_metrics"].get(name) is not None)
        print(f"{run['id']}\t{run['kind']}\t{run['status']}\t{run['step']}/{run['total_steps'] or '?'}\t"
              f"{run['started_at'][:19]}\t{shown}")
    return 0


def _cmd_runs_show(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        run = session.store.run(args.run)
        by_step = session.store.metrics_by_step(args.run)
        rewards = session.store.reward_history(args.run)
    steps = [{"step": step, **values} for step, values in sorted(by_step.items())]
    # A PPO run's reward runs and the first step each scored (a refit's from the step after its checkpoint).
    scored_by = [{"reward_run": row["reward_run"], "first_step": row["from_step"] + 1}
                 for row in rewards] if run.kind == "ppo" else []
    if args.json:
        print_json({"run": run.to_dict(), "steps": steps, "scored_by": scored_by})
        return 0
    print(f"{run.id}: {run.kind} run, {run.status}, step {run.step}/{run.total_steps or '?'}")
    if len(scored_by) > 1:  # a PPO run that switched to a refit's reward run
        print("scored by: " + ", ".join(f"{row['reward_run']} from step {row['first_step']}" for row in scored_by))
    names = list(dict.fromkeys(name for values in by_step.values() for name in values))
    print("\t".join(["step", *names]))
    for row in steps:
        print("\t".join([str(row["step"]), *(_format_value(row.get(name)) for name in names)]))
    return 0


def _format_value(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def register_train_reward(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "train-reward", _cmd_train_reward,
                          "train a LoRA Bradley-Terry reward model on the labeled pairs (Ctrl+C, SIGTERM or a closed "
                          "terminal stops it and keeps the adapter); flags override [reward] in rlhf.toml")
    parser.add_argument("--epochs", type=int, metavar="N", help="passes over the training pairs")
    parser.add_argument("--lr", type=float, metavar="X", help="learning rate")
    add_quantization_option(parser, "the reward base's weights ([reward] quantization)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="pairs per optimizer step")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue this stopped, failed or interrupted run from its last checkpoint, with its "
                             "own settings and pairs")
    add_model_option(parser)
    _add_processes_option(parser)


def register_score(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "score", _cmd_score,
                          "print a trained reward model's standardised score of RESPONSE to PROMPT")
    parser.add_argument("--reward", metavar="RUN", help="reward run id (default: the latest finished one)")
    add_quantization_option(parser, "the reward base's weights (default: as the reward model was trained)")
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument("response", metavar="RESPONSE")


def register_export_reward(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "export-reward", _cmd_export_reward,
                          "write a reward run as a PEFT adapter for AutoModelForSequenceClassification "
                          "(num_labels=1), for trl or transformers")
    parser.add_argument("--reward", metavar="RUN", help="reward run id (default: the latest finished one)")
    parser.add_argument("out", metavar="DIR", help="a new (or empty) folder to write it to")


def register_export_bundle(commands: argparse._SubParsersAction) -> None:
    from ..bundle import ENGINES

    parser = add_command(commands, "export-bundle", _cmd_export_bundle,
                          "write the labels, the reward model and the latest PPO policy adapter in another engine's "
                          "formats (openrlhf, verl, llamafactory, trl), with a README holding its launch command")
    parser.add_argument("--for", dest="engine", required=True, choices=ENGINES,
                        help="openrlhf, verl (needs pyarrow), llamafactory or trl")
    parser.add_argument("--reward", metavar="RUN", help="reward run id (default: the latest finished one)")
    parser.add_argument("--ppo", metavar="RUN",
                        help="PPO run whose last checkpoint's policy adapter goes in (default: the latest PPO run "
                             "with a checkpoint; none when there is no such run)")
    parser.add_argument("out", metavar="DIR", help="a new (or empty) folder to write it to")


def register_ppo(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "ppo", _cmd_ppo,
                          "run PPO (or RLOO / GRPO: --algorithm) against a trained reward model, one progress line "
                          "per step; Ctrl+C, SIGTERM or a closed terminal (SIGHUP) stops after the current step "
                          "with a checkpoint; flags override [ppo] in rlhf.toml")
    parser.add_argument("--reward", metavar="RUN", help="reward run id (default: the latest finished one)")
    parser.add_argument("--algorithm", choices=ALGORITHMS,
                        help="ppo (default: value head and GAE), rloo (leave-one-out baseline) or grpo (group-"
                             "normalised advantages, KL as a loss term); rloo and grpo need no value head")
    parser.add_argument("--samples-per-prompt", type=int, metavar="K",
                        help="rloo and grpo: responses sampled per prompt (default 4)")
    parser.add_argument("--steps", type=int, metavar="N", help="PPO steps to run")
    parser.add_argument("--batch-size", type=int, metavar="B", help="prompts per rollout")
    parser.add_argument("--minibatches", type=int, metavar="M", help="minibatches per PPO epoch")
    parser.add_argument("--epochs", type=int, metavar="E", help="PPO epochs per rollout")
    parser.add_argument("--lr", type=float, metavar="X", help="learning rate")
    parser.add_argument("--init-kl", type=float, metavar="X", help="initial KL coefficient")
    parser.add_argument("--target-kl", type=float, metavar="X", help="KL per response (nats) the controller holds")
    parser.add_argument("--kl-controller", choices=KL_CONTROLLERS,
                        help="how the KL coefficient follows --target-kl: log (default; holds it within tens of "
                             "steps), classic (Ziegler et al.'s: barely moves in a short run) or fixed")
    parser.add_argument("--sft-adapter", metavar="DIR",
                        help="start from this SFT LoRA adapter; the frozen adapter is then the KL reference")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue this stopped, failed or interrupted run from its last checkpoint, with its own "
                             "settings")
    add_model_option(parser)
    add_quantization_option(parser, "the policy base's weights ([model] quantization)")
    _add_processes_option(parser)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_processes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                        help="data-parallel: run in N local processes (one per GPU; on CPU gloo), each on its share "
                             "of every batch, gradients summed; nothing listens beyond 127.0.0.1 (docs/scale-out.md)")


def register_runs(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "runs", _cmd_runs, "list runs: id, kind, status, steps, final metrics")
    parser.add_argument("--json", action="store_true", help="print a JSON array with every field and final metrics")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    show = add_command(actions, "show", _cmd_runs_show, "print one run's metrics, one row per step")
    show.add_argument("run", metavar="RUN")
    show.add_argument("--json", action="store_true",
                      help="print JSON: the run, its steps and (PPO) the reward runs that scored them")
