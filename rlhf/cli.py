"""The headless `rlhf-tui` commands, each run on a workspace. The app (no command, or `app`) is added by the
UI side's entry, `rlhf_tui.app.cli` (app/cli.py), which is the console script: this module never imports the UI.

Adding a command: write `_cmd_<name>(args) -> int` and `_register_<name>(commands)`, then append the
register function to `COMMANDS`. `add_command` gives every subcommand `--workspace` (accepted before
or after the command name); `add_model_option` adds `--model` to commands that load a model;
`load_config` / `open_workspace` give the workspace, its config with CLI overrides applied, and its
store. User errors are `RlhfError`s: `main` prints them on one line and returns exit code 2.
Heavy modules (torch) are imported inside the commands that need them, never here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .agreement import workspace_report
from .config import ALGORITHMS, KL_CONTROLLERS, QUANTIZATION, Config, Workspace, describe_defaults, keys_set_in
from .data_io import (EXPORT_FORMATS, export_pairs, import_pairs, import_prompts, printable, read_pairs,
                      read_prompts)
from .demo_mode import DEMO_NOTICE, is_demo, use_demo_threads, with_demo_defaults
from .distributed import agreed_hooks, current_ranks, is_rank, launch, rank0_first, silence_stdout_unless_writing
from .errors import RlhfError, RunCancelled
from .hooks import RunHooks, RunResult
from .run_requests import RunRequest, StartPPO, StartReward, run_request
from .store import Store

PROG = "rlhf-tui"


@dataclass
class Session:
    workspace: Workspace
    config: Config
    store: Store


def load_config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> tuple[Workspace, Config]:
    """The --workspace directory and its rlhf.toml, with --model and `overrides` (`section.key`: value) applied.

    Overrides whose value is None (flags not given) leave the file's value alone. In demo mode (no model
    named), settings set neither in the file nor by a flag get the demo defaults.
    """
    workspace = Workspace(getattr(args, "workspace", None) or Path.cwd())
    if not workspace.root.is_dir():
        raise RlhfError(f"{workspace.root}: workspace directory does not exist (create it, or pass --workspace DIR)")
    overrides = {"model.name": getattr(args, "model", None), **(overrides or {})}
    overrides.setdefault("model.quantization", getattr(args, "quantization", None))
    config = workspace.load_config().override(overrides)
    chosen = keys_set_in(workspace.config_path) | {key for key, value in overrides.items() if value is not None}
    return workspace, with_demo_defaults(config, chosen)


@contextmanager
def open_workspace(args: argparse.Namespace, overrides: dict[str, Any] | None = None, *,
                   create: bool = False) -> Iterator[Session]:
    """`load_config` plus the workspace store, closed afterwards.

    Without `create`, a workspace that has no rlhf.db yet is an error rather than a new empty database:
    read-only commands run in the wrong directory should say so, not leave a database behind. Runs left
    "running" by a process that was killed are marked interrupted first, so every command sees the truth.
    """
    workspace, config = load_config(args, overrides)
    if not create and not workspace.db_path.exists():
        raise RlhfError(f"{workspace.root}: no {workspace.db_path.name} here yet "
                        "(import prompts with `rlhf-tui prompts import FILE`, or pass --workspace DIR)")
    with Store(workspace.db_path) as store:
        store.mark_interrupted_runs()
        yield Session(workspace, config, store)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


# -- commands --------------------------------------------------------------------------------


def import_prompts_file(store: Store, path: Path, tags: list[str]) -> str:
    """Import a prompts file into `store`; the one-line summary to print."""
    imported, duplicates = import_prompts(store, path, tags)
    return f"imported {_plural(imported, 'prompt')} ({_plural(duplicates, 'duplicate')} skipped)"


def _cmd_prompts_import(args: argparse.Namespace) -> int:
    read_prompts(args.file)  # a bad file fails before the database is created
    with open_workspace(args, create=True) as session:
        print(import_prompts_file(session.store, args.file, args.tag))
    return 0


def _cmd_prompts_list(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        prompts = session.store.prompts(tag=args.tag)
    if args.json:
        _print_json(prompts)
    else:
        for p in prompts:
            print(f"{p['id']}\t{printable(','.join(p['tags']))}\t{printable(p['text'])}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        count = export_pairs(session.store, args.out, fmt=args.format, include_ties=args.include_ties)
    # Said on stderr when the pairs went to stdout, so a pipe gets nothing but JSONL.
    print(f"exported {_plural(count, 'pair')} to {args.out}", file=sys.stderr if _is_stdout(args.out) else sys.stdout)
    return 0


def _is_stdout(path: Path) -> bool:
    """Whether writing `path` writes this process's stdout (`-`, /dev/stdout, /proc/self/fd/1)."""
    if str(path) == "-":
        return True
    try:
        here, there = os.fstat(sys.stdout.fileno()), os.stat(path)
    except (OSError, ValueError):
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _cmd_import_pairs(args: argparse.Namespace) -> int:
    read_pairs(args.file)  # a bad file fails before the database is created
    with open_workspace(args, create=True) as session:
        summary = import_pairs(session.store, args.file)
    identical = f", {summary.identical} skipped as chosen == rejected" if summary.identical else ""
    print(f"imported {_plural(summary.pairs, 'pair')} "
          f"({_plural(summary.new_prompts, 'new prompt')}, {summary.known_prompts} already present; "
          f"{_plural(summary.duplicates, 'duplicate')} skipped{identical})")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        stats = workspace_report(session.store, session.config.label.agreement_window)
    if args.json:
        _print_json(stats)
        return 0
    by_choice = ", ".join(f"{choice} {n}" for choice, n in stats["by_choice"].items())
    runs = ", ".join(f"{kind_status} {n}" for kind_status, n in stats["runs"].items()) or "none"
    print(f"prompts: {stats['prompts']}")
    print(f"responses: {stats['responses']}")
    print(f"comparisons: {stats['comparisons']} ({by_choice})")
    print(f"runs: {runs}")
    if "annotators" in stats:  # there are labeled decisions
        _print_annotator_report(stats)
    _print_reward_model_check(stats["reward_model"])
    return 0


def _share(figures: dict[str, Any], of: str) -> str:
    """'k of n <of> (share, 95% Wilson low-high)' for a share_with_interval dict."""
    low, high = figures["wilson_95"]
    return (f"{figures['agree']} of {_plural(figures['n'], of)} ({figures['share']:.2f}, "
            f"95% Wilson {low:.2f}-{high:.2f})")


def _print_reward_model_check(check: dict[str, Any]) -> None:
    """The reward model's agreement with the labels on pairs it scored as they were served, its alarm, and the
    length-vs-score correlation of the latest PPO run's samples; nothing when there is neither."""
    if check["n"]:
        heldout = check["heldout_accuracy"]
        tested = f", held-out accuracy {heldout:.2f}" if heldout is not None else ""
        print(f"reward model vs labels: agrees on {_share(check, 'label')}, newest {check['n']} judged "
              f"(reward run {check['reward_run']}{tested})")
    if check["warning"]:
        print(f"warning: {check['warning']}")
    length = check["length_score"]
    if length["samples"]:
        r = "n/a" if length["pearson"] is None else f"{length['pearson']:.2f}"
        print(f"length vs score ({length['ppo_run']}): Pearson {r} over {_plural(length['samples'], 'sample')}")


def _print_annotator_report(report: dict[str, Any]) -> None:
    """Per annotator: decisions, side-A share of a/b picks with its 95% Wilson interval (a fair annotator's
    includes 0.5), median decision time; then agreement on the pairs two annotators both labeled."""
    for ann in report["annotators"]:
        picks = ann["a_picks"] + ann["b_picks"]
        low, high = ann["a_share_wilson_95"]
        share = "A share n/a (no a/b picks)" if not picks else \
            f"A share {ann['a_share']:.2f} (95% Wilson {low:.2f}-{high:.2f}, {_plural(picks, 'a/b pick')})"
        median = ann["median_decision_s"]
        timing = f"median {median:.1f} s per decision" if median is not None else "no decision times"
        print(f"annotator {printable(ann['annotator'])}: {_plural(ann['decisions'], 'decision')}, {share}, {timing}")
        if ann["self_consistency"]["n"]:
            print(f"annotator {printable(ann['annotator'])} self-consistency: same answer preferred on "
                  f"{_share(ann['self_consistency'], 'repeated pair')}")
    if not report["agreement"]:
        print("agreement: no shared pairs (one annotator)")
    for pair in report["agreement"]:
        names = " ~ ".join(printable(name) for name in pair["annotators"])
        kappa = "n/a" if pair["cohens_kappa"] is None else f"{pair['cohens_kappa']:.2f}"
        shared = pair["shared_pairs"]
        figures = f"Cohen's kappa {kappa} on {_plural(shared, 'shared pair')}" if shared else "no shared pairs"
        print(f"agreement {names}: {figures}")
    if "krippendorff_alpha" in report:
        overall = report["krippendorff_alpha"]
        alpha = "n/a" if overall["alpha"] is None else f"{overall['alpha']:.2f}"
        print(f"agreement, all {len(report['annotators'])} annotators: Krippendorff's alpha (nominal) {alpha} "
              f"on {_plural(overall['pairs'], 'pair')} labeled by two or more")


def _cmd_config(args: argparse.Namespace) -> int:
    if args.show:
        print(load_config(args)[1].to_toml(), end="")
    else:
        print(describe_defaults(), end="")
    return 0


def _enter_demo_mode(config: Config) -> None:
    """Headless runs on the demo model say so on stderr (the app says so in its header) and use its threads."""
    if is_demo(config):
        print(f"{DEMO_NOTICE} (laptop-CPU demo defaults apply to unset settings: `{PROG} config --show`)",
              file=sys.stderr)
        use_demo_threads(config)


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
def stop_on_ctrl_c(hooks: RunHooks) -> Iterator[list[int]]:
    """The first Ctrl+C, SIGTERM or SIGHUP asks the run to stop after its current step (keeping a checkpoint);
    a second of the same aborts. Yields the signals received, so a command can exit 128 + signal (130, 143, 129).

    After a SIGHUP the terminal is gone: a write to it would raise (EIO) and kill the run before its checkpoint,
    so stdout and stderr are sent to /dev/null from then on; the run's outcome is in `rlhf-tui runs`."""
    received: list[int] = []

    def request_stop(signum: int, frame: Any) -> None:
        received.append(signum)
        hooks.stop_requested.set()
        if signum == signal.SIGHUP:
            _detach_from_terminal()
        else:
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
        _enter_demo_mode(session.config)
        progress = ConsoleProgress(shown) if ranks.writes else RunHooks()
        with stop_on_ctrl_c(progress) as received:
            try:
                result = run_request(session.workspace, request_for(session.config),
                                     agreed_hooks(progress, ranks), session.store)
            except RunCancelled as exc:
                exc.exit_code = stopped_exit_code(received)
                raise
            finally:
                progress.finish()
        ranks.barrier()  # rank 0 has written the run's end (row, reward model) before any rank reads it
        total = session.store.run(result.run_id)["total_steps"]
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
    print(_reward_summary(result, total))
    return 0 if result.status == "finished" else stopped_exit_code(received)


def _reward_summary(result: RunResult, total_steps: int) -> str:
    """The one line `train-reward` ends with: how far it got, how good the model is, what it learned from."""
    from .reward_model import read_reward_meta

    meta = read_reward_meta(Path(result.checkpoint))
    counts, epochs = meta["counts"], meta["config"]["reward"]["epochs"]
    acc = "not measured" if meta["heldout_acc"] is None else f"{meta['heldout_acc']:.3f}"
    if result.status == "finished":
        progress = f"finished {_plural(epochs, 'epoch')} ({meta['steps']} steps)"
    else:
        progress = f"stopped at step {meta['steps']}/{total_steps} ({meta['epochs_completed']} of {epochs} epochs)"
    resume = f"; resume with `{PROG} train-reward --resume {result.run_id}`" if result.status == "stopped" else ""
    return (f"reward run {result.run_id}: {progress} in {meta['seconds']:.1f}s; held-out accuracy {acc} on "
            f"{_plural(counts['heldout'], 'pair')} ({_plural(counts['heldout_prompts'], 'prompt')}); trained on "
            f"{_plural(counts['train'], 'pair')} ({counts['ties']} ties, {counts['truncated']} truncated, "
            f"{counts['identical_skipped']} identical skipped); saved {result.checkpoint}{resume}")


def _cmd_score(args: argparse.Namespace) -> int:
    with open_workspace(args, {"model.quantization": None}) as session:
        run_id = session.store.finished_reward_run(args.reward)["id"]
        from .reward_model import RewardScorer

        scorer = RewardScorer.from_run(session.workspace, run_id, session.config,
                                       quantization=getattr(args, "quantization", None))
        score = scorer.score(args.prompt, args.response)
    print(f"{score:.4f}")
    return 0


def _cmd_export_reward(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        run_id = session.store.finished_reward_run(args.reward)["id"]
        run_dir = session.workspace.run_dir(run_id)
        if not run_dir.is_dir():
            raise RlhfError(f"no run {run_id!r} in {session.workspace.runs_dir} (see `rlhf-tui runs`)")
        from .reward_model import export_sequence_classifier

        out = export_sequence_classifier(run_dir, Path(args.out))
    print(f"reward run {run_id} exported to {out}: load it with PeftModel.from_pretrained("
          f"AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1), {str(out)!r}); "
          "reward.json there has BASE and the mean/std that standardise its scores")
    return 0


def _cmd_export_bundle(args: argparse.Namespace) -> int:
    from .bundle import export_bundle

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
        runs = [{**run, "final_metrics": _final_metrics(session.store, run["id"])} for run in session.store.runs()]
    if args.json:
        _print_json(runs)
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
    steps = [{"step": step, **values} for step, values in sorted(by_step.items())]
    if args.json:
        _print_json({"run": run, "steps": steps})
        return 0
    print(f"{run['id']}: {run['kind']} run, {run['status']}, step {run['step']}/{run['total_steps'] or '?'}")
    names = list(dict.fromkeys(name for values in by_step.values() for name in values))
    print("\t".join(["step", *names]))
    for row in steps:
        print("\t".join([str(row["step"]), *(_format_value(row.get(name)) for name in names)]))
    return 0


def _format_value(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _cmd_eval_prepare(args: argparse.Namespace) -> int:
    from .evaluation import plan_eval, prepare_eval

    with open_workspace(args) as session:
        plan = plan_eval(session.store, session.workspace, run_id=args.run, checkpoint=args.checkpoint,
                         against=args.against, prompt_tag=args.prompts, count=args.n, seed=args.seed)
        _enter_demo_mode(session.config)
        from .models import load_causal_lm, load_tokenizer, pick_device

        trust = session.config.model.trust_remote_code
        quantization = session.store.run(plan.candidate.run_id)["config"]["model"]["quantization"]
        tokenizer = load_tokenizer(plan.model_name, trust_remote_code=trust)
        base = load_causal_lm(plan.model_name, quantization, trust_remote_code=trust, device=pick_device()).eval()
        tty = sys.stderr.isatty()
        session_id = prepare_eval(session.store, plan, base, tokenizer, session.config, progress=lambda done, total: (
            print(f"{CLEAR_LINE}sampling {done}/{total}", end="", file=sys.stderr, flush=True) if tty else None))
    if tty:
        print(file=sys.stderr)
    print(f"eval session {session_id}: {_plural(len(plan.prompts), 'blind pair')} of {plan.candidate.label} vs "
          f"{plan.opponent.label} on held-out prompts (seed {plan.seed}); label them on the app's Eval screen "
          f"(`{PROG}`, then ctrl+e), then `{PROG} eval report`")
    return 0


def _cmd_eval_report(args: argparse.Namespace) -> int:
    from .evaluation import describe_result, eval_report

    with open_workspace(args) as session:
        results = eval_report(session.store)
        sessions = session.store.eval_sessions()
    if args.json:
        _print_json({"results": results, "sessions": sessions})
        return 0
    if not sessions:
        print(f"no evaluation sessions yet: `{PROG} eval prepare` makes one")
        return 0
    for row in results:
        print(describe_result(row))
    for s in sessions:
        print(f"session {s['id']}	{s['candidate']} vs {s['opponent']}	{s['decided']}/{s['pairs']} labeled	"
              f"seed {s['seed']}	{s['created_at'][:19]}")
    return 0


# -- parser ----------------------------------------------------------------------------------


def _workspace_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand that does not see the flag must not reset the value given before it.
    parser.add_argument("--workspace", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                        help="workspace directory holding rlhf.toml, rlhf.db and runs/ (default: current directory)")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=argparse.SUPPRESS, metavar="ID_OR_PATH",
                        help="hub id or local path of the base model (default: model.name in rlhf.toml)")


def _add_quantization_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--quantization", choices=QUANTIZATION, default=argparse.SUPPRESS,
                        help=f"{what}: none, 4bit (bitsandbytes NF4) or 8bit")


def add_command(commands: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
                 summary: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=summary, description=summary)
    _workspace_option(parser)
    parser.set_defaults(handler=handler)
    return parser


def _register_prompts(commands: argparse._SubParsersAction) -> None:
    prompts = commands.add_parser("prompts", help="import or list prompts", description="Import or list prompts.")
    _workspace_option(prompts)
    actions = prompts.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = add_command(actions, "import", _cmd_prompts_import,
                       "import prompts from .txt (one per line), .jsonl (prompt or chat messages) or .csv "
                       "(prompt column); duplicates are skipped, a bad line imports nothing")
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--tag", action="append", default=[], metavar="T",
                     help="add this tag to every new prompt (repeatable)")
    lst = add_command(actions, "list", _cmd_prompts_list, "list prompts: id, tags, text")
    lst.add_argument("--tag", metavar="T", help="only prompts with this tag")
    lst.add_argument("--json", action="store_true", help="print a JSON array with every field")


def _register_export(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "export", _cmd_export,
                          "write labeled pairs as JSONL (ties only with --include-ties; both_bad and skip never)")
    parser.add_argument("out", type=Path, metavar="OUT.jsonl", help="the file to write (- for stdout)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="trl",
                        help="trl: prompt/chosen/rejected strings; messages: the same as chat messages; "
                             "openai: preference fine-tuning (default: trl)")
    parser.add_argument("--include-ties", action="store_true", help="also write ties, marked \"tie\": true")


def _register_import_pairs(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "import-pairs", _cmd_import_pairs,
                          "import preference pairs (trl JSONL: prompt, chosen, rejected, optional margin) "
                          "as comparisons; a bad line imports nothing")
    parser.add_argument("file", type=Path, metavar="FILE.jsonl")


def _register_stats(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "stats", _cmd_stats,
                          "count prompts, responses, comparisons by choice, runs; then per annotator: decisions, "
                          "side-A share (position bias), median decision time, and agreement (Cohen's kappa, "
                          "Krippendorff's alpha) on pairs labeled by more than one")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _register_config(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "config", _cmd_config,
                          "print every config field with its default and doc (a starting rlhf.toml)")
    parser.add_argument("--show", action="store_true",
                        help="print the effective config of the workspace instead (rlhf.toml + flags)")
    add_model_option(parser)


def _register_train_reward(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "train-reward", _cmd_train_reward,
                          "train a LoRA Bradley-Terry reward model on the labeled pairs (Ctrl+C, SIGTERM or a closed "
                          "terminal stops it and keeps the adapter); flags override [reward] in rlhf.toml")
    parser.add_argument("--epochs", type=int, metavar="N", help="passes over the training pairs")
    parser.add_argument("--lr", type=float, metavar="X", help="learning rate")
    _add_quantization_option(parser, "the reward base's weights ([reward] quantization)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="pairs per optimizer step")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue this stopped, failed or interrupted run from its last checkpoint, with its "
                             "own settings and pairs")
    add_model_option(parser)
    _add_processes_option(parser)


def _register_score(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "score", _cmd_score,
                          "print a trained reward model's standardised score of RESPONSE to PROMPT")
    parser.add_argument("--reward", metavar="RUN", help="reward run id (default: the latest finished one)")
    _add_quantization_option(parser, "the reward base's weights (default: as the reward model was trained)")
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument("response", metavar="RESPONSE")


def _register_export_reward(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "export-reward", _cmd_export_reward,
                          "write a reward run as a PEFT adapter for AutoModelForSequenceClassification "
                          "(num_labels=1), for trl or transformers")
    parser.add_argument("--reward", metavar="RUN", help="reward run id (default: the latest finished one)")
    parser.add_argument("out", metavar="DIR", help="a new (or empty) folder to write it to")


def _register_export_bundle(commands: argparse._SubParsersAction) -> None:
    from .bundle import ENGINES

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


def _register_ppo(commands: argparse._SubParsersAction) -> None:
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
    _add_quantization_option(parser, "the policy base's weights ([model] quantization)")
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


def _register_runs(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "runs", _cmd_runs, "list runs: id, kind, status, steps, final metrics")
    parser.add_argument("--json", action="store_true", help="print a JSON array with every field and final metrics")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    show = add_command(actions, "show", _cmd_runs_show, "print one run's metrics, one row per step")
    show.add_argument("run", metavar="RUN")
    show.add_argument("--json", action="store_true", help="print JSON: the run and its steps")


def _register_eval(commands: argparse._SubParsersAction) -> None:
    from .evaluation import DEFAULT_EVAL_PAIRS, REFERENCE

    parser = commands.add_parser("eval", help="blind evaluation of a PPO checkpoint on held-out prompts",
                                 description="Blind evaluation: prepare pairs (one answer from a PPO checkpoint, one "
                                             "from the reference or another run, sides randomized), label them on "
                                             "the app's Eval screen, then report the win rate.")
    _workspace_option(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = add_command(actions, "prepare", _cmd_eval_prepare,
                           "sample blind pairs on prompts the PPO run never drew for a rollout and store them as an "
                           "evaluation session")
    prepare.add_argument("--run", metavar="RUN", help="PPO run to evaluate (default: the latest with a checkpoint)")
    prepare.add_argument("--checkpoint", type=int, metavar="STEP",
                         help="its checkpoint's step (default: its latest, the only one kept)")
    prepare.add_argument("--against", default=REFERENCE, metavar="reference|RUN",
                         help="the opponent: the reference (adapters off; the SFT adapter if the run started from "
                              "one) or another PPO run's latest checkpoint (default: reference)")
    prepare.add_argument("--prompts", metavar="TAG", help="only held-out prompts with this tag (default: any)")
    prepare.add_argument("-n", type=int, default=DEFAULT_EVAL_PAIRS, metavar="N",
                         help=f"pairs to prepare (default {DEFAULT_EVAL_PAIRS}; fewer when fewer prompts are held out)")
    prepare.add_argument("--seed", type=int, metavar="S",
                         help="picks the prompts, sides and samples (default: random; stored with the session)")
    report = add_command(actions, "report", _cmd_eval_report,
                          "win rate of each evaluated checkpoint (ties count half) with its 95%% Wilson interval")
    report.add_argument("--json", action="store_true", help="print JSON: results and sessions")

# Every subcommand is registered here, in the order `--help` lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_prompts,
    _register_export,
    _register_import_pairs,
    _register_stats,
    _register_config,
    _register_train_reward,
    _register_score,
    _register_export_reward,
    _register_export_bundle,
    _register_ppo,
    _register_runs,
    _register_eval,
]


def _no_command(args: argparse.Namespace) -> int:
    raise RlhfError("name a command (see --help); `rlhf-tui` with no command opens the app")


def build_parser(commands: Sequence[Callable[[argparse._SubParsersAction], None]] = COMMANDS, *,
                 description: str = "Label preference pairs, train a reward model and run PPO: the headless "
                                    "commands.") -> argparse.ArgumentParser:
    """The parser for `commands` (in `--help` order) and the options accepted before any command name.

    The UI's entry (app/cli.py) passes its `app` command too and makes opening the app the default.
    """
    parser = argparse.ArgumentParser(prog=PROG, description=description)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _workspace_option(parser)
    add_model_option(parser)
    _add_quantization_option(parser, "the base model's weights ([model] quantization)")
    parser.set_defaults(handler=_no_command)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in commands:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command line (`parser` defaults to `build_parser()`); the exit code. Errors are one line."""
    try:
        args = (parser or build_parser()).parse_args(argv)
        args.command_line = list(sys.argv[1:] if argv is None else argv)  # what `--processes` starts again
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.handler(args)
    except RunCancelled as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except RlhfError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`rlhf-tui prompts list | head`); silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
