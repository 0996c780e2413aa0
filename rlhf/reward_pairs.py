"""The preference pairs a reward run trains on: which pairs are usable, their token ids, the held-out split
by prompt, and the record (pairs.json) that makes a resumed run train on the same pairs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from .config import Config
from .errors import RlhfError, describe_write_error
from .reward_model import encode_response
from .store import Store

PAIRS_FILE = "pairs.json"  # the comparisons a run trains on: a resumed run trains on the same ones


def is_heldout(prompt_id: int, seed: int, fraction: float) -> bool:
    """Deterministic split by prompt: a hash of (seed, prompt id) mapped to [0, 1) and compared with `fraction`."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def usable_pairs(store: Store, cfg: Config) -> tuple[list[dict[str, Any]], int]:
    """Decided pairs (plus ties, and blind-evaluation decisions, if configured) whose two answers differ, and how
    many identical ones were left out."""
    pairs = store.preference_pairs(include_ties=cfg.reward.use_ties, include_eval=cfg.reward.use_eval_labels)
    usable = [p for p in pairs if p["chosen"] != p["rejected"]]
    missing = cfg.reward.min_pairs - len(usable)
    if missing > 0:
        raise RlhfError(f"only {len(usable)} usable preference pairs, reward training needs at least "
                        f"{cfg.reward.min_pairs}: label {missing} more (or import some with "
                        "`rlhf-tui import-pairs`, or lower [reward] min_pairs)")
    return usable, len(pairs) - len(usable)


@dataclass
class EncodedPair:
    prompt_id: int
    chosen: list[int]
    rejected: list[int]
    chosen_response_id: int
    rejected_response_id: int
    margin: float
    is_tie: bool
    truncated: bool


def encode_pairs(pairs: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[EncodedPair]:
    """Each pair's chosen and rejected token ids as the reward model scores them (`encode_response`)."""
    out = []
    for pair in pairs:
        chosen, cut_c = encode_response(tokenizer, pair["prompt"], pair["chosen"], max_length, pair["prompt_messages"])
        rejected, cut_r = encode_response(tokenizer, pair["prompt"], pair["rejected"], max_length,
                                          pair["prompt_messages"])
        out.append(EncodedPair(pair["prompt_id"], chosen, rejected, pair["chosen_id"], pair["rejected_id"],
                               pair["margin"] or 0.0, pair["choice"] == "tie", cut_c or cut_r))
    return out


def data_hash(pairs: list[dict[str, Any]]) -> str:
    """A hash of the training data as used: prompts, both answers, choice and margin of every pair."""
    content = [(p["prompt"], p["prompt_messages"], p["chosen"], p["rejected"], p["choice"], p["margin"])
               for p in pairs]
    return hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()[:16]


def split_heldout(pairs: list[EncodedPair], seed: int, fraction: float) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(training pairs, held-out pairs), split by prompt with `is_heldout`."""
    heldout = [p for p in pairs if is_heldout(p.prompt_id, seed, fraction)]
    return [p for p in pairs if not is_heldout(p.prompt_id, seed, fraction)], heldout


def write_pairs_record(folder: Path, pairs: list[dict[str, Any]], identical: int) -> None:
    """Write pairs.json into a new run's folder: the comparison ids it trains on, their data hash and how many
    identical pairs were left out."""
    record = {"comparison_ids": [p["comparison_id"] for p in pairs], "data_hash": data_hash(pairs),
              "identical_skipped": identical}
    (folder / PAIRS_FILE).write_text(json.dumps(record), encoding="utf-8")


def pairs_of_run(run_dir: Path, usable: list[dict[str, Any]], run_id: str) -> tuple[list[dict[str, Any]], int, int]:
    """The pairs a resumed run started with, as the store holds them now, how many identical ones it left out and
    how many usable pairs it does not use (labeled since); an error if any of its pairs changed."""
    if not (run_dir / PAIRS_FILE).is_file():
        raise RlhfError(f"{run_dir}: no {PAIRS_FILE} (a run of an older rlhf-tui, or a folder that was moved): "
                        "it cannot resume; train a new reward model with `rlhf-tui train-reward`")
    comparison_ids, recorded_hash, identical = _recorded_pairs(run_dir / PAIRS_FILE)
    by_id = {p["comparison_id"]: p for p in usable}
    pairs = [by_id[i] for i in comparison_ids if i in by_id]
    if len(pairs) < len(comparison_ids) or data_hash(pairs) != recorded_hash:
        raise RlhfError(f"the preference pairs run {run_id} trained on changed since it started (labels undone or "
                        "edited): it cannot resume; train a new reward model with `rlhf-tui train-reward`")
    return pairs, identical, len(usable) - len(pairs)


def _recorded_pairs(path: Path) -> tuple[list[int], str, int]:
    """What `write_pairs_record` wrote: comparison ids, their data hash, the identical pairs left out."""
    try:
        recorded, problem = json.loads(path.read_text(encoding="utf-8")), ""
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 or not JSON
        recorded, problem = None, describe_write_error(exc)
    keys = ("comparison_ids", "data_hash", "identical_skipped")
    ids, hashed, identical = (recorded.get(key) for key in keys) if isinstance(recorded, dict) else (None,) * 3
    if problem or not (isinstance(ids, list) and all(type(i) is int for i in ids) and isinstance(hashed, str)
                       and type(identical) is int):
        raise RlhfError(f"{path}: damaged, not the list of pairs rlhf-tui wrote ({problem or 'unexpected contents'}): "
                        "the run cannot resume; train a new reward model with `rlhf-tui train-reward`")
    return ids, hashed, identical

