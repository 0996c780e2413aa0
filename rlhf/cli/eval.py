"""The blind-evaluation commands: `eval prepare` and `eval report`."""

from __future__ import annotations

import argparse
import sys

from .common import PROG, add_command, enter_demo_mode, open_workspace, plural, print_json, workspace_option
from .runs import CLEAR_LINE


def _cmd_eval_prepare(args: argparse.Namespace) -> int:
    from ..evaluation import plan_eval, prepare_eval

    with open_workspace(args) as session:
        plan = plan_eval(session.store, session.workspace, run_id=args.run, checkpoint=args.checkpoint,
                         against=args.against, prompt_tag=args.prompts, count=args.n, seed=args.seed)
        enter_demo_mode(session.config)
        from ..models import load_causal_lm, load_tokenizer, pick_device

        trust = session.config.model.trust_remote_code
        quantization = session.store.run(plan.candidate.run_id).config["model"]["quantization"]
        tokenizer = load_tokenizer(plan.model_name, trust_remote_code=trust)
        base = load_causal_lm(plan.model_name, quantization, trust_remote_code=trust, device=pick_device()).eval()
        tty = sys.stderr.isatty()
        session_id = prepare_eval(session.store, plan, base, tokenizer, session.config, progress=lambda done, total: (
            print(f"{CLEAR_LINE}sampling {done}/{total}", end="", file=sys.stderr, flush=True) if tty else None))
    if tty:
        print(file=sys.stderr)
    print(f"eval session {session_id}: {plural(len(plan.prompts), 'blind pair')} of {plan.candidate.label} vs "
          f"{plan.opponent.label} on held-out prompts (seed {plan.seed}); label them on the app's Eval screen "
          f"(`{PROG}`, then ctrl+e), then `{PROG} eval report`")
    return 0


def _cmd_eval_report(args: argparse.Namespace) -> int:
    from ..evaluation import describe_result, eval_report

    with open_workspace(args) as session:
        results = eval_report(session.store)
        sessions = session.store.eval_sessions()
    if args.json:
        print_json({"results": results, "sessions": sessions})
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


def register_eval(commands: argparse._SubParsersAction) -> None:
    from ..evaluation import DEFAULT_EVAL_PAIRS, REFERENCE

    parser = commands.add_parser("eval", help="blind evaluation of a PPO checkpoint on held-out prompts",
                                 description="Blind evaluation: prepare pairs (one answer from a PPO checkpoint, one "
                                             "from the reference or another run, sides randomized), label them on "
                                             "the app's Eval screen, then report the win rate.")
    workspace_option(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = add_command(actions, "prepare", _cmd_eval_prepare,
                           "sample blind pairs on prompts the PPO run never drew for a rollout and store them as an "
                           "evaluation session")
    prepare.add_argument("--run", metavar="RUN", help="PPO run to evaluate (default: the latest with a checkpoint)")
    prepare.add_argument("--checkpoint", type=int, metavar="STEP",
                         help="its checkpoint's step: any it keeps (its newest ppo.keep_checkpoints; default: its "
                              "latest)")
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
