"""Prompt and preference-pair files: read prompts (.txt, .jsonl, .csv), import and export pairs (.jsonl).

Readers check the whole file before anything is stored, so one bad line imports nothing. Every
problem is an `InputFileError` whose message starts with `file:line:` when a line is to blame.
Pairs use trl's preference format (`prompt`, `chosen`, `rejected`, optional `margin`), plain or
conversational, so `export` -> `import_pairs` round-trips. No torch here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputFileError, RlhfError
from .store import PromptItem, Store

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
PAIR_SUFFIXES = (".jsonl",)
EXPORT_FORMATS = ("trl", "messages", "openai")
ROLES = ("system", "user", "assistant")


@dataclass
class PairItem:
    """One preference: `chosen` was preferred over `rejected` for `prompt` (a tie if `tie`)."""

    prompt: PromptItem
    chosen: str
    rejected: str
    margin: float | None = None
    tie: bool = False


@dataclass
class PairImportSummary:
    pairs: int
    new_prompts: int
    known_prompts: int


# -- reading files ---------------------------------------------------------------------------


def _read_text(path: Path, suffixes: tuple[str, ...], what: str) -> str:
    """The file's text, after the checks every import shares (exists, a file, known suffix, UTF-8)."""
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, expected a {what} file")
    if path.suffix.lower() not in suffixes:
        raise InputFileError(f"{path}: unknown extension {path.suffix or '(none)'!r} for {what} "
                             f"(expected {' or '.join(suffixes)})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror})") from None
    if not data.strip():
        raise InputFileError(f"{path}: empty file, no {what} to import")
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputFileError(f"{path}:{_line_of(data, nul)}: binary file (NUL byte at offset {nul}); "
                             "expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}:{_line_of(data, exc.start)}: not UTF-8 (byte 0x{data[exc.start]:02x} "
                             f"at offset {exc.start}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _lines(text: str) -> list[str]:
    """Lines without their endings; blank lines at the end of the file are dropped."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _jsonl_objects(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, object) for each line; a blank line in the middle or a non-object is an error."""
    for number, line in enumerate(_lines(text), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise InputFileError(f"{where}: empty line (JSONL needs one JSON object per line)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise InputFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def _messages(where: str, value: Any, name: str) -> list[dict[str, str]]:
    """A validated chat: a non-empty list of {role, content} with known roles (extra keys dropped)."""
    if not isinstance(value, list) or not value:
        raise InputFileError(f"{where}: {name!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InputFileError(f"{where}: {name}[{i}] must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise InputFileError(f"{where}: {name}[{i}] has role {message.get('role')!r} "
                                 f"(expected {', '.join(ROLES)})")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt(where: str, value: Any, name: str) -> PromptItem:
    """A prompt from a string or a chat ending with the user's turn (its text is that turn)."""
    if isinstance(value, str):
        if not value.strip():
            raise InputFileError(f"{where}: empty prompt")
        return PromptItem(text=value.strip())
    if not isinstance(value, list):
        raise InputFileError(f"{where}: {name!r} must be a string or a list of messages, "
                             f"got {type(value).__name__}")
    messages = _messages(where, value, name)
    if messages[-1]["role"] != "user":
        raise InputFileError(f"{where}: {name!r} must end with a user message (the model answers it)")
    if not messages[-1]["content"].strip():
        raise InputFileError(f"{where}: empty prompt (the last user message has no text)")
    return PromptItem(text=messages[-1]["content"], messages=messages)


def _tags(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise InputFileError(f"{where}: 'tags' must be a list of non-empty strings")
    return [t.strip() for t in value]


def _prompts_from_txt(path: Path, text: str) -> list[PromptItem]:
    items = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            raise InputFileError(f"{path}:{number}: empty prompt (remove the blank line)")
        items.append(PromptItem(text=line.strip()))
    return items


def _prompts_from_jsonl(path: Path, text: str) -> list[PromptItem]:
    items = []
    for where, obj in _jsonl_objects(path, text):
        if "prompt" in obj and "messages" in obj:
            raise InputFileError(f"{where}: has both 'prompt' and 'messages'; give one")
        if "prompt" not in obj and "messages" not in obj:
            raise InputFileError(f"{where}: needs a 'prompt' string or chat 'messages' "
                                 f"(keys found: {', '.join(obj) or 'none'})")
        name = "prompt" if "prompt" in obj else "messages"
        item = _prompt(where, obj[name], name)
        if "tags" in obj:
            item.tags = _tags(where, obj["tags"])
        items.append(item)
    return items


def _prompts_from_csv(path: Path, text: str) -> list[PromptItem]:
    reader = csv.reader(io.StringIO("\n".join(_lines(text)), newline=""), strict=True)
    try:
        header = [column.strip() for column in next(reader)]
        columns = [column.lower() for column in header]
        if "prompt" not in columns:
            raise InputFileError(f"{path}:1: no 'prompt' column (columns found: {', '.join(header)})")
        prompt_col = columns.index("prompt")
        tags_col = columns.index("tags") if "tags" in columns else None
        items = []
        start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not row:
                raise InputFileError(f"{where}: empty line (remove it)")
            if len(row) != len(header):
                raise InputFileError(f"{where}: {len(row)} fields but the header has {len(header)} "
                                     "(quote fields that contain commas)")
            if not row[prompt_col].strip():
                raise InputFileError(f"{where}: empty prompt")
            tags = [t.strip() for t in row[tags_col].split(",") if t.strip()] if tags_col is not None else []
            items.append(PromptItem(text=row[prompt_col].strip(), tags=tags))
    except csv.Error as exc:
        raise InputFileError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return items


_PROMPT_READERS = {".txt": _prompts_from_txt, ".jsonl": _prompts_from_jsonl, ".csv": _prompts_from_csv}


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Every prompt in a .txt (one per line), .jsonl (`prompt` or chat `messages`) or .csv (`prompt` column)."""
    path = Path(path)
    text = _read_text(path, PROMPT_SUFFIXES, "prompts")
    items = _PROMPT_READERS[path.suffix.lower()](path, text)
    if not items:
        raise InputFileError(f"{path}: no prompts in the file")
    return items


def import_prompts(store: Store, path: str | Path, tags: Sequence[str] = ()) -> tuple[int, int]:
    """Store the file's prompts not already present, each with `tags` added; returns (imported, duplicates)."""
    path = Path(path)
    items = read_prompts(path)
    for item in items:
        item.tags = list(dict.fromkeys([*item.tags, *tags]))
    ids, duplicates = store.add_prompts(items, source=f"import:{path.name}")
    return len(ids) - duplicates, duplicates


# -- preference pairs ------------------------------------------------------------------------


def _response(where: str, value: Any, name: str) -> str:
    """A response: a string, or (conversational form) a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InputFileError(f"{where}: {name!r} must be a string or a list of messages, "
                             f"got {type(value).__name__}")
    messages = _messages(where, value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise InputFileError(f"{where}: {name!r} must hold exactly one assistant message, got "
                             f"{', '.join(m['role'] for m in messages)}")
    return messages[0]["content"]


def _margin(where: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputFileError(f"{where}: 'margin' must be a finite number, got {value!r}")
    return float(value)


def read_pairs(path: str | Path) -> list[PairItem]:
    """Preference pairs from trl-format JSONL: `prompt`, `chosen`, `rejected` as strings or as messages."""
    path = Path(path)
    text = _read_text(path, PAIR_SUFFIXES, "preference pairs")
    pairs = []
    for where, obj in _jsonl_objects(path, text):
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in obj]
        if missing:
            raise InputFileError(f"{where}: missing {', '.join(repr(k) for k in missing)} "
                                 "(expected trl preference pairs: prompt, chosen, rejected)")
        tie = obj.get("tie", False)
        if not isinstance(tie, bool):
            raise InputFileError(f"{where}: 'tie' must be true or false, got {tie!r}")
        pairs.append(PairItem(
            prompt=_prompt(where, obj["prompt"], "prompt"),
            chosen=_response(where, obj["chosen"], "chosen"),
            rejected=_response(where, obj["rejected"], "rejected"),
            margin=_margin(where, obj.get("margin")),
            tie=tie,
        ))
    return pairs


def import_pairs(store: Store, path: str | Path) -> PairImportSummary:
    """Store each pair as two responses and a comparison (chosen shown as A), all in one transaction."""
    path = Path(path)
    pairs = read_pairs(path)
    source = f"import:{path.name}"
    with store.transaction():
        known_before = {prompt["id"] for prompt in store.prompts()}
        prompt_ids, _ = store.add_prompts([pair.prompt for pair in pairs], source=source)
        for prompt_id, pair in zip(prompt_ids, pairs):
            chosen_id = store.add_response(prompt_id, pair.chosen, model=None, source=source)
            rejected_id = store.add_response(prompt_id, pair.rejected, model=None, source=source)
            store.add_comparison(prompt_id, chosen_id, rejected_id, "tie" if pair.tie else "a",
                                 margin=pair.margin, source=source)
    # Distinct prompts: a prompt with four pairs in the file is one new prompt, not one new and three known.
    distinct = set(prompt_ids)
    return PairImportSummary(pairs=len(pairs), new_prompts=len(distinct - known_before),
                             known_prompts=len(distinct & known_before))


def _export_record(pair: dict[str, Any], fmt: str) -> dict[str, Any]:
    """One line of the export, from a `Store.preference_pairs` row."""
    if fmt == "trl":
        record: dict[str, Any] = {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
    else:
        prompt = pair["prompt_messages"] or [{"role": "user", "content": pair["prompt"]}]
        chosen = [{"role": "assistant", "content": pair["chosen"]}]
        rejected = [{"role": "assistant", "content": pair["rejected"]}]
        if fmt == "openai":
            return {"input": {"messages": prompt}, "preferred_output": chosen, "non_preferred_output": rejected}
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if pair["margin"] is not None:
        record["margin"] = pair["margin"]
    if pair["choice"] == "tie":
        record["tie"] = True
    return record


def export_pairs(store: Store, out_path: str | Path, fmt: str = "trl", include_ties: bool = False) -> int:
    """Write decided comparisons as JSONL (trl, messages or openai); returns the number of pairs.

    Ties are written only with `include_ties` (marked `"tie": true`); both_bad and skip never.
    The file appears whole or not at all (temp file, then rename).
    """
    if fmt not in EXPORT_FORMATS:
        raise RlhfError(f"unknown export format {fmt!r} (choose {', '.join(EXPORT_FORMATS)})")
    if fmt == "openai" and include_ties:
        raise RlhfError("the openai preference format has no ties: drop --include-ties")
    out = Path(out_path)
    if out.is_dir():
        raise RlhfError(f"{out}: is a directory, expected an output file name")
    if not out.parent.is_dir():
        raise RlhfError(f"{out.parent}: directory does not exist (create it first)")
    pairs = store.preference_pairs(include_ties=include_ties)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(_export_record(pair, fmt), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise RlhfError(f"{out}: cannot write ({exc.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)  # already gone after a successful rename
    return len(pairs)
