"""Prompt and preference-pair files: read prompts (.txt, .jsonl, .csv), import and export pairs (.jsonl).

Readers check the whole file before anything is stored, so one bad line imports nothing. Every
problem is an `InputFileError` whose message starts with `file:line:` when a line is to blame.
Pairs use trl's preference format (`prompt`, `chosen`, `rejected`, optional `margin`), plain or
conversational, so `export` -> `import_pairs` round-trips. No torch here.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Workspace
from .errors import InputFileError, RlhfError, describe_write_error
from .store import PromptItem, Store

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
PAIR_SUFFIXES = (".jsonl",)
EXPORT_FORMATS = ("trl", "messages", "openai")
ROLES = ("system", "user", "assistant")
# Margins are reward differences (trl's RewardTrainer subtracts them from r_chosen - r_rejected); datasets use
# 0 to about 10. Far beyond that the loss only measures the margin, and past float32's 3.4e38 it is inf.
MAX_ABS_MARGIN = 100.0
# Byte order marks of the UTF-16/32 files Windows tools write (Notepad's "Unicode", PowerShell's `>`): the
# text is decoded by the mark. UTF-32 first: its little-endian mark begins with UTF-16's.
BOM_ENCODINGS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                 (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # universal newlines: Unix, Windows and old Mac (CR only)
# What a terminal acts on instead of showing: C0/C1 controls (ESC starts colour, cursor and title sequences),
# DEL, line separators and the bidirectional overrides that make text display in another order than it reads.
TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# The part of those that json.dumps writes as it is (it escapes every character below 0x20 itself).
JSON_RAW_CONTROLS = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


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
    pairs: int  # stored
    new_prompts: int
    known_prompts: int
    duplicates: int = 0  # the same prompt, answers and label as a pair already stored (or earlier in the file)
    identical: int = 0  # chosen == rejected: no preference to learn from


def printable(text: str) -> str:
    """`text` safe to print on one terminal line: each control character written as its Python escape
    (`\\n`, `\\t`, `\\x1b`, `\\u202e`), so a prompt cannot move the cursor, recolour or retitle the terminal."""
    return TERMINAL_CONTROLS.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def terminal_json(value: Any) -> str:
    """`value` as indented JSON that is safe to print: what json.dumps leaves as it is and a terminal acts on
    (DEL, C1 controls such as the one-byte CSI, line separators, bidirectional overrides) is written as a
    `\\uXXXX` escape, so the output reads back as the very same value."""
    text = json.dumps(value, ensure_ascii=False, indent=2)
    return JSON_RAW_CONTROLS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


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
    for bom, encoding in BOM_ENCODINGS:
        if data.startswith(bom):
            return _decode_with_bom(path, data, encoding)
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


def _decode_with_bom(path: Path, data: bytes, encoding: str) -> str:
    """A UTF-16/32 file's text (the codec reads the byte order mark and drops it)."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not valid {encoding.upper()} despite its byte order mark (at offset "
                             f"{exc.start}); save the file as UTF-8") from None
    if "\0" in text:
        raise InputFileError(f"{path}: binary file (a NUL character in {encoding.upper()} text); "
                             "expected text")
    return text


def _line_of(data: bytes, offset: int) -> int:
    return len(LINE_BREAK.findall(data[:offset].decode("latin-1"))) + 1


def _lines(text: str) -> list[str]:
    """Lines without their endings (LF, CRLF or CR); blank lines at the end of the file are dropped."""
    lines = LINE_BREAK.split(text)
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
        except RecursionError:
            raise InputFileError(f"{where}: JSON nested too deeply (arrays or objects inside each other hundreds "
                                 "of levels down); fix the line") from None
        if not isinstance(obj, dict):
            raise InputFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        _check_no_lone_surrogate(where, obj)
        yield where, obj


def _check_no_lone_surrogate(where: str, obj: dict[str, Any]) -> None:
    """JSON may escape half of a UTF-16 pair (`"\\ud800"`): Python decodes it to a string that is not text
    and that SQLite refuses to store."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputFileError(f"{where}: a lone UTF-16 surrogate \\u{ord(exc.object[exc.start]):04x} in a string "
                             "(half of an escaped character pair; not text): fix the program that wrote "
                             "the file") from None


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
    if len(messages) == 1:  # the very prompt its text is (the model sees one user turn either way): one key
        return PromptItem(text=messages[0]["content"].strip())
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
    """A margin within +-MAX_ABS_MARGIN (NaN and inf fail the comparison; a 400-digit integer too, unconverted)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_ABS_MARGIN <= value <= MAX_ABS_MARGIN:
        shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:20] + "..."
        raise InputFileError(f"{where}: 'margin' must be a number from {-MAX_ABS_MARGIN:g} to {MAX_ABS_MARGIN:g} "
                             f"(a reward difference; datasets use 0 to about 10), got {shown}")
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


def pair_identity(prompt_id: int, chosen: str, rejected: str, tie: bool) -> tuple[Any, ...]:
    """What makes two preferences the same one: prompt, both answers and the label (a tie has no order)."""
    answers = tuple(sorted((chosen, rejected))) if tie else (chosen, rejected)
    return prompt_id, *answers, tie


def import_pairs(store: Store, path: str | Path) -> PairImportSummary:
    """Store each pair as two responses and a comparison (chosen shown as A), all in one transaction.

    Skipped, and counted: pairs whose chosen and rejected answers are the same text, and exact duplicates
    of a pair already stored or earlier in the file (importing a file twice, or an export, adds nothing).
    """
    path = Path(path)
    read = read_pairs(path)
    pairs = [pair for pair in read if pair.chosen != pair.rejected]
    source = f"import:{path.name}"
    stored_prompts: list[int] = []
    with store.transaction():
        known_before = {prompt["id"] for prompt in store.prompts()}
        seen = {pair_identity(p["prompt_id"], p["chosen"], p["rejected"], p["choice"] == "tie")
                for p in store.preference_pairs(include_ties=True)}
        prompt_ids, _ = store.add_prompts([pair.prompt for pair in pairs], source=source)
        for prompt_id, pair in zip(prompt_ids, pairs):
            identity = pair_identity(prompt_id, pair.chosen, pair.rejected, pair.tie)
            if identity in seen:
                continue
            seen.add(identity)
            chosen_id = store.add_response(prompt_id, pair.chosen, model=None, source=source)
            rejected_id = store.add_response(prompt_id, pair.rejected, model=None, source=source)
            store.add_comparison(prompt_id, chosen_id, rejected_id, "tie" if pair.tie else "a",
                                 margin=pair.margin, source=source)
            stored_prompts.append(prompt_id)
    # Distinct prompts: a prompt with four pairs in the file is one new prompt, not one new and three known.
    distinct = set(stored_prompts)
    return PairImportSummary(pairs=len(stored_prompts), new_prompts=len(distinct - known_before),
                             known_prompts=len(distinct & known_before),
                             duplicates=len(pairs) - len(stored_prompts), identical=len(read) - len(pairs))


def export_record(pair: dict[str, Any], fmt: str) -> dict[str, Any]:
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


def export_pairs(store: Store, out_path: str | Path, fmt: str = "trl", include_ties: bool = False,
                 include_eval: bool = False) -> int:
    """Write decided comparisons as JSONL (trl, messages or openai); returns the number of pairs.

    Ties are written only with `include_ties` (marked `"tie": true`); both_bad and skip never. Decisions on blind
    evaluation pairs only with `include_eval`.
    Never writes over the workspace's own files (rlhf.db, rlhf.toml, runs/) or any SQLite database. A regular
    file appears whole or not at all (temp file, then rename); a symlink keeps pointing where it did, at the new
    file; a FIFO or device (`/dev/stdout`, `/dev/null`) is written into, never replaced; `-` is stdout.
    """
    if fmt not in EXPORT_FORMATS:
        raise RlhfError(f"unknown export format {fmt!r} (choose {', '.join(EXPORT_FORMATS)})")
    if fmt == "openai" and include_ties:
        raise RlhfError("the openai preference format has no ties: drop --include-ties")
    pairs = store.preference_pairs(include_ties=include_ties, include_eval=include_eval)
    lines = (json.dumps(export_record(pair, fmt), ensure_ascii=False) + "\n" for pair in pairs)
    if str(out_path) == "-":
        sys.stdout.writelines(lines)
        return len(pairs)
    out = Path(out_path)
    # A FIFO or a device (/dev/null, /dev/stdout's pipe): written into, as renaming over it would replace it.
    into_stream = out.exists() and not out.is_file() and not out.is_dir()
    target = out if into_stream else out.resolve()  # through symlinks: the file that would be written
    if target.is_dir():
        raise RlhfError(f"{out}: is a directory, expected an output file name")
    if not target.parent.is_dir():
        raise RlhfError(f"{target.parent}: directory does not exist (create it first)")
    if Workspace(store.path.parent).owns(target):
        raise RlhfError(f"{out}: is this workspace's own state (rlhf.db, rlhf.toml, runs/): "
                        "export to a new file name, e.g. pairs.jsonl")
    if _is_sqlite_file(target):
        raise RlhfError(f"{out}: is a SQLite database, not written over: export to a new file name, e.g. pairs.jsonl")
    try:
        if into_stream:
            with open(target, "w", encoding="utf-8") as f:
                f.writelines(lines)
        else:
            _write_atomically(target, lines)
    except OSError as exc:
        raise RlhfError(f"{out}: cannot write ({describe_write_error(exc)})") from None
    return len(pairs)


def _is_sqlite_file(path: Path) -> bool:
    if not path.is_file():  # opening a FIFO to peek would block
        return False
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _write_atomically(path: Path, lines: Iterator[str]) -> None:
    """`lines` into a temp file beside `path`, synced, then renamed over it: never half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # already gone after a successful rename
