"""The data commands: `prompts import|list`, `export`, `import-pairs`, `stats`, `config`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..agreement import workspace_report
from ..config import describe_defaults
from ..data_io import EXPORT_FORMATS, export_pairs, import_pairs, import_prompts, printable, read_pairs, read_prompts
from ..store import Store
from .common import add_command, add_model_option, load_config, open_workspace, plural, print_json, workspace_option


def import_prompts_file(store: Store, path: Path, tags: list[str]) -> str:
    """Import a prompts file into `store`; the one-line summary to print."""
    imported, duplicates = import_prompts(store, path, tags)
    return f"imported {plural(imported, 'prompt')} ({plural(duplicates, 'duplicate')} skipped)"


def _cmd_prompts_import(args: argparse.Namespace) -> int:
    read_prompts(args.file)  # a bad file fails before the database is created
    with open_workspace(args, create=True) as session:
        print(import_prompts_file(session.store, args.file, args.tag))
    return 0


def _cmd_prompts_list(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        prompts = session.store.prompts(tag=args.tag)
    if args.json:
        print_json(prompts)
    else:
        for p in prompts:
            print(f"{p['id']}\t{printable(','.join(p['tags']))}\t{printable(p['text'])}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        count = export_pairs(session.store, args.out, fmt=args.format, include_ties=args.include_ties,
                             include_eval=args.include_eval)
    # Said on stderr when the pairs went to stdout, so a pipe gets nothing but JSONL.
    print(f"exported {plural(count, 'pair')} to {args.out}", file=sys.stderr if _is_stdout(args.out) else sys.stdout)
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
    print(f"imported {plural(summary.pairs, 'pair')} "
          f"({plural(summary.new_prompts, 'new prompt')}, {summary.known_prompts} already present; "
          f"{plural(summary.duplicates, 'duplicate')} skipped{identical})")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with open_workspace(args) as session:
        stats = workspace_report(session.store, session.config.label.agreement_window)
    if args.json:
        print_json(stats)
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
    return (f"{figures['agree']} of {plural(figures['n'], of)} ({figures['share']:.2f}, "
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
        print(f"length vs score ({length['ppo_run']}): Pearson {r} over {plural(length['samples'], 'sample')}")


def _print_annotator_report(report: dict[str, Any]) -> None:
    """Per annotator: decisions, side-A share of a/b picks with its 95% Wilson interval (a fair annotator's
    includes 0.5), median decision time; then agreement on the pairs two annotators both labeled."""
    for ann in report["annotators"]:
        picks = ann["a_picks"] + ann["b_picks"]
        low, high = ann["a_share_wilson_95"]
        share = "A share n/a (no a/b picks)" if not picks else \
            f"A share {ann['a_share']:.2f} (95% Wilson {low:.2f}-{high:.2f}, {plural(picks, 'a/b pick')})"
        median = ann["median_decision_s"]
        timing = f"median {median:.1f} s per decision" if median is not None else "no decision times"
        print(f"annotator {printable(ann['annotator'])}: {plural(ann['decisions'], 'decision')}, {share}, {timing}")
        if ann["self_consistency"]["n"]:
            print(f"annotator {printable(ann['annotator'])} self-consistency: same answer preferred on "
                  f"{_share(ann['self_consistency'], 'repeated pair')}")
    if not report["agreement"]:
        print("agreement: no shared pairs (one annotator)")
    for pair in report["agreement"]:
        names = " ~ ".join(printable(name) for name in pair["annotators"])
        kappa = "n/a" if pair["cohens_kappa"] is None else f"{pair['cohens_kappa']:.2f}"
        shared = pair["shared_pairs"]
        figures = f"Cohen's kappa {kappa} on {plural(shared, 'shared pair')}" if shared else "no shared pairs"
        print(f"agreement {names}: {figures}")
    if "krippendorff_alpha" in report:
        overall = report["krippendorff_alpha"]
        alpha = "n/a" if overall["alpha"] is None else f"{overall['alpha']:.2f}"
        print(f"agreement, all {len(report['annotators'])} annotators: Krippendorff's alpha (nominal) {alpha} "
              f"on {plural(overall['pairs'], 'pair')} labeled by two or more")


def _cmd_config(args: argparse.Namespace) -> int:
    if args.show:
        print(load_config(args)[1].to_toml(), end="")
    else:
        print(describe_defaults(), end="")
    return 0


def register_prompts(commands: argparse._SubParsersAction) -> None:
    prompts = commands.add_parser("prompts", help="import or list prompts", description="Import or list prompts.")
    workspace_option(prompts)
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


def register_export(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "export", _cmd_export,
                          "write labeled pairs as JSONL (ties only with --include-ties; both_bad and skip never)")
    parser.add_argument("out", type=Path, metavar="OUT.jsonl", help="the file to write (- for stdout)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="trl",
                        help="trl: prompt/chosen/rejected strings; messages: the same as chat messages; "
                             "openai: preference fine-tuning (default: trl)")
    parser.add_argument("--include-ties", action="store_true", help="also write ties, marked \"tie\": true")
    parser.add_argument("--include-eval", action="store_true",
                        help="also write decisions on blind evaluation pairs (`eval`; left out by default)")


def register_import_pairs(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "import-pairs", _cmd_import_pairs,
                          "import preference pairs (trl JSONL: prompt, chosen, rejected, optional margin) "
                          "as comparisons; a bad line imports nothing")
    parser.add_argument("file", type=Path, metavar="FILE.jsonl")


def register_stats(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "stats", _cmd_stats,
                          "count prompts, responses, comparisons by choice, runs; then per annotator: decisions, "
                          "side-A share (position bias), median decision time, and agreement (Cohen's kappa, "
                          "Krippendorff's alpha) on pairs labeled by more than one")
    parser.add_argument("--json", action="store_true", help="print JSON")


def register_config(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "config", _cmd_config,
                          "print every config field with its default and doc (a starting rlhf.toml)")
    parser.add_argument("--show", action="store_true",
                        help="print the effective config of the workspace instead (rlhf.toml + flags)")
    add_model_option(parser)
