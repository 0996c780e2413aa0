"""Prompt files (.txt, .jsonl, .csv) and preference pairs (trl JSONL): every bad input gives one
`file:line: reason` and imports nothing; export -> import round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data_io import (export_pairs, import_pairs, import_prompts, printable, read_pairs, read_prompts,
                          terminal_json)
from rlhf.errors import InputFileError, RlhfError, StoreError
from rlhf.store import PromptItem, Store

MARGIN_RULE = "'margin' must be a number from -100 to 100 (a reward difference; datasets use 0 to about 10)"
CHAT = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture
def empty_store(tmp_path: Path):
    with Store(tmp_path / "rlhf.db") as store:
        yield store


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def _jsonl(tmp_path: Path, name: str, rows: list) -> Path:
    return _write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


def _error(path: Path, reader=read_prompts) -> str:
    with pytest.raises(InputFileError) as err:
        reader(path)
    message = str(err.value)
    assert "\n" not in message
    return message


# -- prompts: each format ----------------------------------------------------------------------


def test_txt_one_prompt_per_line_trailing_blank_lines_and_crlf_allowed(tmp_path: Path):
    path = _write(tmp_path, "p.txt", "\ufeffWrite a haiku\r\n  Name three rivers  \r\n\r\n\n")
    assert [(p.text, p.messages, p.tags) for p in read_prompts(path)] == [
        ("Write a haiku", None, []), ("Name three rivers", None, [])]


@pytest.mark.parametrize("content, line", [("one\n\ntwo\n", 2), ("one\ntwo\n   \nthree", 3)])
def test_txt_blank_line_in_the_middle_is_an_error(tmp_path: Path, content: str, line: int):
    path = _write(tmp_path, "p.txt", content)
    assert _error(path) == f"{path}:{line}: empty prompt (remove the blank line)"


def test_jsonl_prompt_or_messages_with_tags(tmp_path: Path):
    path = _jsonl(tmp_path, "p.jsonl", [
        {"prompt": " Tell a joke ", "tags": ["fun", "short"], "id": 7},
        {"messages": CHAT},
        {"prompt": CHAT},  # trl's conversational prompt-only form
    ])
    items = read_prompts(path)
    assert (items[0].text, items[0].tags, items[0].messages) == ("Tell a joke", ["fun", "short"], None)
    assert (items[1].text, items[1].messages) == ("Say hello.", CHAT)
    assert items[2] == items[1]


@pytest.mark.parametrize("line3, reason", [
    ('{"prompt": "unterminated', "invalid JSON (Unterminated string starting at at column 12)"),
    ('["a list"]', "expected a JSON object, got list"),
    ("", "empty line (JSONL needs one JSON object per line)"),
    ('{"text": "x", "id": 1}', "needs a 'prompt' string or chat 'messages' (keys found: text, id)"),
    ('{"prompt": "x", "messages": []}', "has both 'prompt' and 'messages'; give one"),
    ('{"prompt": "   "}', "empty prompt"),
    ('{"prompt": 42}', "'prompt' must be a string or a list of messages, got int"),
    ('{"messages": []}', "'messages' must be a non-empty list of {role, content} messages"),
    ('{"messages": [{"role": "robot", "content": "x"}]}',
     "messages[0] has role 'robot' (expected system, user, assistant)"),
    ('{"messages": [{"role": "user"}]}', "messages[0] must be an object with a string 'content'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "'messages' must end with a user message (the model answers it)"),
    ('{"prompt": "x", "tags": "fun"}', "'tags' must be a list of non-empty strings"),
])
def test_jsonl_bad_line_names_file_line_and_reason(tmp_path: Path, line3: str, reason: str):
    path = _write(tmp_path, "p.jsonl", f'{{"prompt": "a"}}\n{{"prompt": "b"}}\n{line3}\n{{"prompt": "d"}}\n')
    assert _error(path) == f"{path}:3: {reason}"


def test_csv_prompt_column_with_tags_and_quoted_newlines(tmp_path: Path):
    path = _write(tmp_path, "p.csv", 'id,Prompt,tags\n1,"Write, briefly",fun\n2,"Line one\nline two","a, b,"\n'
                                     "3,Plain,\n")
    items = read_prompts(path)
    assert [(p.text, p.tags) for p in items] == [
        ("Write, briefly", ["fun"]), ("Line one\nline two", ["a", "b"]), ("Plain", [])]


@pytest.mark.parametrize("content, reason", [
    ("id,text\n1,hello\n", "1: no 'prompt' column (columns found: id, text)"),
    ('prompt,tags\nok,x\n"multi\nline",y\nbad,x,extra\n',
     "5: 3 fields but the header has 2 (quote fields that contain commas)"),
    ("prompt\nok\n  \nlast\n", "3: empty prompt"),
    ("prompt,tags\nok,x\n\nlast,y\n", "3: empty line (remove it)"),
    ('prompt\n"never closed\n', "2: malformed CSV (unexpected end of data)"),
])
def test_csv_errors(tmp_path: Path, content: str, reason: str):
    path = _write(tmp_path, "p.csv", content)
    assert _error(path) == f"{path}:{reason}"


def test_csv_with_only_a_header_has_no_prompts(tmp_path: Path):
    path = _write(tmp_path, "p.csv", "prompt,tags\n")
    assert _error(path) == f"{path}: no prompts in the file"


# -- files that are not prompt files -----------------------------------------------------------


def test_missing_file_directory_and_unknown_extension(tmp_path: Path):
    assert _error(tmp_path / "nope.txt") == f"{tmp_path / 'nope.txt'}: no such file"
    (tmp_path / "dir.txt").mkdir()
    assert _error(tmp_path / "dir.txt") == f"{tmp_path / 'dir.txt'}: is a directory, expected a prompts file"
    path = _write(tmp_path, "p.md", "hello\n")
    assert _error(path) == f"{path}: unknown extension '.md' for prompts (expected .txt or .jsonl or .csv)"


@pytest.mark.parametrize("content", [b"", b" \n\n\t\n"])
def test_empty_file(tmp_path: Path, content: bytes):
    path = _write(tmp_path, "p.txt", content)
    assert _error(path) == f"{path}: empty file, no prompts to import"


def test_binary_file_names_the_nul_byte(tmp_path: Path):
    path = _write(tmp_path, "p.txt", b"ok\nalso ok\n\x89PNG\x00\x01")
    assert _error(path) == f"{path}:3: binary file (NUL byte at offset 15); expected UTF-8 text"


def test_non_utf8_file_names_line_and_offset(tmp_path: Path):
    path = _write(tmp_path, "p.txt", "caf\u00e9\n".encode() + "na\u00efve\n".encode("latin-1"))
    assert _error(path) == f"{path}:2: not UTF-8 (byte 0xef at offset 8); save the file as UTF-8"


def test_old_mac_line_endings_split_lines(tmp_path: Path):
    path = _write(tmp_path, "p.txt", b"one\rtwo\r\nthree\rfour\r")
    assert [p.text for p in read_prompts(path)] == ["one", "two", "three", "four"]
    binary = _write(tmp_path, "b.txt", b"one\rtwo\r\x00")
    assert _error(binary) == f"{binary}:3: binary file (NUL byte at offset 8); expected UTF-8 text"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_with_a_byte_order_mark_are_decoded(tmp_path: Path, encoding: str):
    text = "Write a haiku\r\nNommez trois rivi\u00e8res \u2713\r\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # the -be codec writes no mark; Windows tools do
    path = _write(tmp_path, "p.txt", data)
    assert [p.text for p in read_prompts(path)] == ["Write a haiku", "Nommez trois rivi\u00e8res \u2713"]


def test_utf16_file_cut_mid_character_says_so(tmp_path: Path):
    path = _write(tmp_path, "p.txt", "hello\n".encode("utf-16") + b"\x41")
    assert _error(path) == (f"{path}: not valid UTF-16 despite its byte order mark (at offset 14); "
                            "save the file as UTF-8")


def test_json_nested_100k_deep_is_one_line(tmp_path: Path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert _error(path) == (f"{path}:2: JSON nested too deeply (arrays or objects inside each other hundreds of "
                            "levels down); fix the line")


def test_lone_surrogate_escape_is_refused(tmp_path: Path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "fine \\ud83d\\ude00"}\n{"prompt": "half \\ud800 of it"}\n')
    assert _error(path) == (f"{path}:2: a lone UTF-16 surrogate \\ud800 in a string (half of an escaped "
                            "character pair; not text): fix the program that wrote the file")


def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("a\nb\tc\x1b]0;title\x07\x1b[2J\x9b\x7f\u202eevil") == \
        "a\\nb\\tc\\x1b]0;title\\x07\\x1b[2J\\x9b\\x7f\\u202eevil"
    assert printable("caf\u00e9 \u2713 \u4e2d") == "caf\u00e9 \u2713 \u4e2d"


def test_terminal_json_escapes_what_json_leaves_raw_and_reads_back_the_same():
    value = {"text": "a\x1b[2J\x9b31m\x7f\u202eevil\u2028caf\u00e9", "n": 1}
    text = terminal_json(value)
    assert "\\u009b31m\\u007f\\u202eevil\\u2028caf\u00e9" in text and "\\u001b[2J" in text  # json.dumps's own
    assert not set(text) & {"\x1b", "\x9b", "\x7f", "\u202e", "\u2028"}
    assert json.loads(text) == value


def test_bad_prompt_file_imports_nothing(tmp_path: Path, empty_store: Store):
    path = _write(tmp_path, "p.txt", "one\ntwo\n\nfour\n")
    with pytest.raises(InputFileError):
        import_prompts(empty_store, path)
    assert empty_store.prompts() == []


def test_import_prompts_adds_tags_and_skips_duplicates(tmp_path: Path, empty_store: Store):
    path = _jsonl(tmp_path, "p.jsonl", [{"prompt": "a", "tags": ["x"]}, {"prompt": "b"}, {"prompt": "a"}])
    assert import_prompts(empty_store, path, tags=["batch1", "x"]) == (2, 1)
    assert import_prompts(empty_store, path) == (0, 3)
    assert [(p["text"], p["tags"], p["source"]) for p in empty_store.prompts()] == [
        ("a", ["x", "batch1"], "import:p.jsonl"), ("b", ["batch1", "x"], "import:p.jsonl")]


# -- pairs -------------------------------------------------------------------------------------


def test_read_pairs_plain_and_conversational(tmp_path: Path):
    path = _jsonl(tmp_path, "pairs.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 2},
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "Bonjour."}],
         "rejected": [{"role": "assistant", "content": "Hello."}]},
        {"prompt": "Pick one", "chosen": "", "rejected": "this", "tie": True},
    ])
    first, chat, tie = read_pairs(path)
    assert (first.prompt.text, first.chosen, first.rejected, first.margin, first.tie) == ("2+2?", "4", "5", 2.0, False)
    assert (chat.prompt.messages, chat.chosen, chat.rejected, chat.margin) == (CHAT, "Bonjour.", "Hello.", None)
    assert (tie.chosen, tie.tie) == ("", True)


@pytest.mark.parametrize("row, reason", [
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": []},
     "missing 'prompt' (expected trl preference pairs: prompt, chosen, rejected)"),
    ({"prompt": "q", "chosen": "a"}, "missing 'rejected' (expected trl preference pairs: prompt, chosen, rejected)"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, f"{MARGIN_RULE}, got 'big'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": True}, f"{MARGIN_RULE}, got True"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1e308}, f"{MARGIN_RULE}, got 1e+308"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": -100.5}, f"{MARGIN_RULE}, got -100.5"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 10 ** 400}, f"{MARGIN_RULE}, got 1{'0' * 19}..."),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "tie": 1}, "'tie' must be true or false, got 1"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "'chosen' must hold exactly one assistant message, got user"),
    ({"prompt": "q", "chosen": "a", "rejected": None},
     "'rejected' must be a string or a list of messages, got NoneType"),
])
def test_read_pairs_errors(tmp_path: Path, row: dict, reason: str):
    path = _jsonl(tmp_path, "pairs.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    assert _error(path, read_pairs) == f"{path}:2: {reason}"


def test_read_pairs_refuses_nan_margin_and_other_extensions(tmp_path: Path):
    path = _write(tmp_path, "pairs.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}\n')
    assert _error(path, read_pairs) == f"{path}:1: {MARGIN_RULE}, got nan"
    csv_path = _write(tmp_path, "pairs.csv", "prompt,chosen,rejected\nq,a,b\n")
    assert _error(csv_path, read_pairs) == (f"{csv_path}: unknown extension '.csv' for preference pairs "
                                            "(expected .jsonl)")


def test_import_pairs_stores_prompts_responses_and_comparisons(tmp_path: Path, empty_store: Store):
    empty_store.add_prompts([PromptItem("2+2?")], source="earlier")
    path = _jsonl(tmp_path, "prefs.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome", "tie": True},
    ])
    summary = import_pairs(empty_store, path)
    assert (summary.pairs, summary.new_prompts, summary.known_prompts) == (3, 1, 1)
    assert [p["text"] for p in empty_store.prompts()] == ["2+2?", "Capital of France?"]
    comparisons = empty_store.comparisons()
    assert [(c["choice"], c["margin"], c["source"], c["annotator"]) for c in comparisons] == [
        ("a", 1.5, "import:prefs.jsonl", None), ("a", None, "import:prefs.jsonl", None),
        ("tie", None, "import:prefs.jsonl", None)]
    side_a = empty_store.response(comparisons[1]["response_a_id"])
    side_b = empty_store.response(comparisons[1]["response_b_id"])
    assert (side_a["text"], side_b["text"]) == ("Paris", "Lyon")
    assert (side_a["model"], side_a["source"], side_a["prompt_id"]) == (None, "import:prefs.jsonl", 2)


def test_import_pairs_skips_exact_duplicates_and_identical_answers(tmp_path: Path, empty_store: Store):
    path = _jsonl(tmp_path, "prefs.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2.0},  # the same preference, another margin
        {"prompt": "q", "chosen": "b", "rejected": "a"},  # the opposite preference: kept
        {"prompt": "q", "chosen": "c", "rejected": "d", "tie": True},
        {"prompt": "q", "chosen": "d", "rejected": "c", "tie": True},  # a tie has no order
        {"prompt": "q", "chosen": "c", "rejected": "d"},  # a tie and a preference differ
        {"prompt": "new", "chosen": "same", "rejected": "same"},  # nothing to learn: skipped, prompt not added
    ])
    summary = import_pairs(empty_store, path)
    assert (summary.pairs, summary.duplicates, summary.identical, summary.new_prompts) == (4, 2, 1, 1)
    again = import_pairs(empty_store, path)
    assert (again.pairs, again.duplicates, again.identical, again.new_prompts, again.known_prompts) == (0, 6, 1, 0, 0)
    assert (empty_store.stats()["comparisons"], [p["text"] for p in empty_store.prompts()]) == (4, ["q"])


def test_import_of_an_export_adds_nothing(tmp_path: Path, labeled_store: Store):
    out = tmp_path / "out.jsonl"
    # B won the first pair (its chosen is side B); messages keep the chat prompt's system turn, which trl drops.
    export_pairs(labeled_store, out, fmt="messages", include_ties=True)
    before = labeled_store.stats()
    summary = import_pairs(labeled_store, out)
    assert (summary.pairs, summary.duplicates) == (0, 3)
    assert labeled_store.stats() == before


def test_import_pairs_bad_line_imports_nothing(tmp_path: Path, empty_store: Store):
    path = _write(tmp_path, "prefs.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2"}\n')
    with pytest.raises(InputFileError, match=r"prefs.jsonl:2: missing 'chosen', 'rejected'"):
        import_pairs(empty_store, path)
    assert empty_store.stats()["prompts"] == empty_store.stats()["responses"] == 0


def test_import_pairs_store_failure_half_way_rolls_everything_back(tmp_path: Path, empty_store: Store,
                                                                    monkeypatch):
    path = _jsonl(tmp_path, "prefs.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)])
    real_add = empty_store.add_comparison
    calls = []

    def fail_on_third(*args, **kwargs):  # the disk fills up on the third pair
        calls.append(1)
        if len(calls) == 3:
            raise StoreError("database or disk is full")
        return real_add(*args, **kwargs)

    monkeypatch.setattr(empty_store, "add_comparison", fail_on_third)
    with pytest.raises(StoreError):
        import_pairs(empty_store, path)
    stats = empty_store.stats()
    assert (stats["prompts"], stats["responses"], stats["comparisons"]) == (0, 0, 0)


# -- export ------------------------------------------------------------------------------------


@pytest.fixture
def labeled_store(empty_store: Store) -> Store:
    """One pair of each choice: plain prompt (B wins, margin 2), chat prompt (A wins), tie, both_bad, skip."""
    (plain, chat), _ = empty_store.add_prompts([PromptItem("2+2?"), PromptItem("Say hello.", messages=CHAT)], "t")
    for prompt_id, a_text, b_text, choice, margin in [
        (plain, "5", "4", "b", 2.0), (chat, "Bonjour.", "Hello.", "a", None), (plain, "four", "4", "tie", None),
        (plain, "3", "6", "both_bad", None), (chat, "x", "y", "skip", None),
    ]:
        a = empty_store.add_response(prompt_id, a_text, model="m")
        b = empty_store.add_response(prompt_id, b_text, model="m")
        empty_store.add_comparison(prompt_id, a, b, choice, margin=margin)
    return empty_store


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_export_trl(tmp_path: Path, labeled_store: Store):
    out = tmp_path / "out.jsonl"
    assert export_pairs(labeled_store, out) == 2
    assert _read_jsonl(out) == [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 2.0},
                                {"prompt": "Say hello.", "chosen": "Bonjour.", "rejected": "Hello."}]
    assert export_pairs(labeled_store, out, include_ties=True) == 3
    assert _read_jsonl(out)[2] == {"prompt": "2+2?", "chosen": "four", "rejected": "4", "tie": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "rlhf.db", "rlhf.db-shm", "rlhf.db-wal"]


def test_export_messages_uses_the_stored_chat(tmp_path: Path, labeled_store: Store):
    out = tmp_path / "out.jsonl"
    export_pairs(labeled_store, out, fmt="messages")
    assert _read_jsonl(out) == [
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}], "margin": 2.0},
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "Bonjour."}],
         "rejected": [{"role": "assistant", "content": "Hello."}]}]


def test_export_openai_preference_format(tmp_path: Path, labeled_store: Store):
    out = tmp_path / "out.jsonl"
    export_pairs(labeled_store, out, fmt="openai")
    assert _read_jsonl(out)[1] == {"input": {"messages": CHAT},
                                   "preferred_output": [{"role": "assistant", "content": "Bonjour."}],
                                   "non_preferred_output": [{"role": "assistant", "content": "Hello."}]}
    with pytest.raises(RlhfError, match="no ties"):
        export_pairs(labeled_store, out, fmt="openai", include_ties=True)


def test_export_errors_leave_the_old_file(tmp_path: Path, labeled_store: Store):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    with pytest.raises(RlhfError, match="unknown export format 'csv'"):
        export_pairs(labeled_store, out, fmt="csv")
    with pytest.raises(RlhfError, match="directory does not exist"):
        export_pairs(labeled_store, tmp_path / "missing" / "out.jsonl")
    with pytest.raises(RlhfError, match="is a directory"):
        export_pairs(labeled_store, tmp_path)
    assert out.read_text(encoding="utf-8") == "previous\n"


@pytest.mark.parametrize("fmt", ["trl", "messages"])
def test_export_then_import_round_trips(tmp_path: Path, labeled_store: Store, fmt: str):
    first = tmp_path / "first.jsonl"
    export_pairs(labeled_store, first, fmt=fmt, include_ties=True)
    with Store(tmp_path / "other.db") as other:
        assert import_pairs(other, first).pairs == 3
        second = tmp_path / "second.jsonl"
        export_pairs(other, second, fmt=fmt, include_ties=True)
    assert second.read_text(encoding="utf-8") == first.read_text(encoding="utf-8")


def test_trl_export_loads_with_datasets(tmp_path: Path, labeled_store: Store):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out.jsonl"
    export_pairs(labeled_store, out)
    rows = datasets.load_dataset("json", data_files=str(out), split="train")
    assert rows["chosen"] == ["4", "Bonjour."] and rows["prompt"] == ["2+2?", "Say hello."]
