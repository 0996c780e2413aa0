"""`rlhf-tui refit`: the Label screen's `f` for a PPO run trained headless (or in the app): a reward model trained
now on every label so far, with the recipe of the reward run that scores the PPO run, which switches to it at its
next checkpoint (`rlhf.refit`)."""

from __future__ import annotations

import argparse
import sys

from ..errors import RlhfError, RunCancelled
from ..run_rows import Run, RunStatus
from ..store import Store
from .common import PROG, add_command, enter_demo_mode, open_workspace
from .runs import ConsoleProgress, reward_summary, stop_on_ctrl_c, stopped_exit_code


def running_ppo_run(store: Store, run_id: str | None) -> Run:
    """The PPO run to refit for: `run_id`, or the one PPO run now training; one-line errors otherwise."""
    if run_id is not None:
        run = store.run(run_id)
        if run.kind != "ppo":
            raise RlhfError(f"run {run_id!r} is a {run.kind} run: refit switches a training PPO run's reward model")
        if run.status != RunStatus.RUNNING:
            raise RlhfError(f"PPO run {run_id!r} is {run.status}, not training: refit switches the reward of a "
                            f"training run (for a new reward model alone: `{PROG} train-reward`)")
        return run
    running = [run for run in store.runs("ppo") if run.status == RunStatus.RUNNING]
    if not running:
        raise RlhfError(f"no PPO run is training: refit switches the reward of a training run (for a new reward "
                        f"model alone: `{PROG} train-reward`)")
    if len(running) > 1:
        raise RlhfError(f"{len(running)} PPO runs are training ({', '.join(run.id for run in running)}): name one")
    return running[0]


def _cmd_refit(args: argparse.Namespace) -> int:
    from ..refit import current_reward_run, request_reward_switch, train_refit

    with open_workspace(args) as session:
        store = session.store
        ppo = running_ppo_run(store, args.run)
        current = current_reward_run(store, ppo.id, ppo.step)
        enter_demo_mode(session.config)
        print(f"refit for PPO run {ppo.id} (step {ppo.step}, scored by reward run {current}): a reward model on "
              "every label so far, with that run's settings", file=sys.stderr)
        progress = ConsoleProgress(("loss", "train_acc", "heldout_acc"))
        with stop_on_ctrl_c(progress) as received:
            try:
                result = train_refit(session.workspace, store, current, session.config, progress)
            except RunCancelled as exc:
                exc.exit_code = stopped_exit_code(received)
                raise
            finally:
                progress.finish()
        if result.status != RunStatus.FINISHED:
            print(f"refit {result.run_id}: {result.status} ({result.message}); PPO run {ppo.id} keeps scoring with "
                  f"reward run {current}", file=sys.stderr)
            return 1 if result.status == RunStatus.FAILED else stopped_exit_code(received)
        print(reward_summary(result, store.run(result.run_id).total_steps))
        ppo = store.run(ppo.id)
        if ppo.status != RunStatus.RUNNING:
            print(f"PPO run {ppo.id} is {ppo.status} now: it was not switched (the reward run stays, for a new PPO "
                  f"run: `{PROG} ppo --reward {result.run_id}`)", file=sys.stderr)
            return 1
        request_reward_switch(session.workspace.run_dir(ppo.id), result.run_id)
    print(f"PPO run {ppo.id} switches to reward run {result.run_id} at its next checkpoint (`{PROG} runs show "
          f"{ppo.id}` says from which step)")
    return 0


def register_refit(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "refit", _cmd_refit,
                         "train a reward model on every label so far, with the settings of the reward run that "
                         "scores a training PPO run, and have that run switch to it at its next checkpoint (the "
                         "Label screen's `f`); Ctrl+C stops the refit and changes nothing")
    parser.add_argument("run", nargs="?", metavar="RUN", help="the PPO run (default: the one training)")
