"""Prompts, responses and the person's decisions on them (label quality included: the reward model's verdicts,
repeated pairs), and the preference pairs reward training reads."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


from ..agreement import reward_margin
from ..errors import StoreError
from .connection import PROMPT_CLAIM_TTL_S, Connection, _pid_alive, now_iso
from .schema import CHOICES


@dataclass
class PromptItem:
    """A prompt to import: plain text, or chat messages (then `text` is the last user turn)."""

    text: str
    messages: list[dict[str, str]] | None = None
    tags: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Identity used to skip duplicates: the text, or the whole conversation."""
        content = json.dumps(self.messages, sort_keys=True) if self.messages else self.text.strip()
        return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _decode_prompt(row: dict[str, Any]) -> dict[str, Any]:
    row["messages"] = json.loads(row["messages"]) if row["messages"] else None
    row["tags"] = json.loads(row["tags"]) if row["tags"] else []
    return row


class LabelQueries(Connection):
    """Prompts, responses, comparisons."""

    # -- prompts -----------------------------------------------------------------------------

    def add_prompts(self, items: list[PromptItem], source: str) -> tuple[list[int], int]:
        """Insert prompts not already present (by key), in one transaction.

        Returns (ids of every item, new or existing, in input order; count of duplicates skipped).
        """
        ids: list[int] = []
        duplicates = 0
        created = now_iso()
        with self.transaction():
            for item in items:
                key = item.key
                row = self.db.execute("SELECT id FROM prompts WHERE key = ?", [key]).fetchone()
                if row:
                    duplicates += 1
                    ids.append(row[0])
                    continue
                cur = self.db.execute(
                    "INSERT INTO prompts (key, text, messages, tags, source, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [key, item.text, json.dumps(item.messages) if item.messages else None,
                     json.dumps(item.tags) if item.tags else None, source, created])
                ids.append(cur.lastrowid)
        return ids, duplicates

    def prompts(self, tag: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM prompts"
        params: list[Any] = []
        if tag:
            sql += " WHERE EXISTS (SELECT 1 FROM json_each(prompts.tags) WHERE value = ?)"
            params.append(tag)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_decode_prompt(r) for r in self._query(sql, params)]

    def prompt(self, prompt_id: int) -> dict[str, Any]:
        rows = self._query("SELECT * FROM prompts WHERE id = ?", [prompt_id])
        if not rows:
            raise StoreError(f"no prompt with id {prompt_id}")
        return _decode_prompt(rows[0])

    def prompt_order_for_labeling(self, seed: int, exclude: Iterable[int] = ()) -> list[int]:
        """Prompt ids to label next: unlabeled first, then least-labeled; ties shuffled by seed.

        Skips count as looked at, so a skipped prompt moves behind the ones nobody has seen.
        """
        rows = self._query("""
            SELECT p.id, COUNT(c.id) AS n FROM prompts p LEFT JOIN comparisons c ON c.prompt_id = p.id
            GROUP BY p.id""")
        excluded = set(exclude)
        rng = random.Random(seed)
        shuffled = [r for r in rows if r["id"] not in excluded]
        rng.shuffle(shuffled)
        shuffled.sort(key=lambda r: r["n"])  # stable: keeps the shuffle within each count
        return [r["id"] for r in shuffled]

    def claim_next_prompt(self, seed: int, held: Iterable[int] = (), *,
                          ttl_s: float = PROMPT_CLAIM_TTL_S) -> int | None:
        """The next prompt to label, claimed for this process so that another session labeling the same
        workspace is not served it at the same time; None when there are no prompts.

        `held` are the prompts this process's session shows or queues: their claims are renewed and its
        other claims released (decided or dropped). Preference: a prompt in nobody's hands (in
        `prompt_order_for_labeling` order); else one this session holds (a repeat, when everything is
        queued); else one another session holds. Claims of processes that are gone do not count.
        """
        owner, now, held = os.getpid(), time.time(), set(held)
        claim = ("INSERT INTO prompt_claims (prompt_id, owner_pid, expires_at) VALUES (?, ?, ?) "
                 "ON CONFLICT (prompt_id) DO UPDATE SET expires_at = excluded.expires_at "
                 "WHERE owner_pid = excluded.owner_pid")
        with self.transaction():  # the write lock first: two sessions cannot pick the same free prompt
            others = set()
            for row in self._query("SELECT prompt_id, owner_pid, expires_at FROM prompt_claims"):
                mine = row["owner_pid"] == owner
                lapsed = row["expires_at"] < now or (not mine and not _pid_alive(row["owner_pid"]))
                if lapsed or (mine and row["prompt_id"] not in held):
                    self.db.execute("DELETE FROM prompt_claims WHERE prompt_id = ?", [row["prompt_id"]])
                elif not mine:
                    others.add(row["prompt_id"])
            order = (self.prompt_order_for_labeling(seed, exclude=held | others)
                     or self.prompt_order_for_labeling(seed, exclude=others)
                     or self.prompt_order_for_labeling(seed))
            chosen = order[0] if order else None
            claimed = held if chosen is None else held | {chosen}
            self.db.conn.executemany(claim, [(prompt_id, owner, now + ttl_s) for prompt_id in claimed])
        return chosen

    # -- responses ---------------------------------------------------------------------------

    def add_response(self, prompt_id: int, text: str, *, model: str | None, adapter: str | None = None,
                     sampling: dict[str, Any] | None = None, seed: int | None = None,
                     prompt_tokens: int | None = None, response_tokens: int | None = None,
                     finished: bool | None = None, source: str = "generated", run_id: str | None = None,
                     run_step: int | None = None, run_checkpoint: str | None = None) -> int:
        """Store one answer; `run_id`, `run_step` and `run_checkpoint` name a run's policy that sampled it
        between the run's steps (None: the labeling model)."""
        with self.transaction():
            cur = self.db.execute(
                """INSERT INTO responses (prompt_id, text, model, adapter, sampling, seed, prompt_tokens,
                   response_tokens, finished, source, created_at, run_id, run_step, run_checkpoint)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [prompt_id, text, model, adapter, json.dumps(sampling) if sampling is not None else None, seed,
                 prompt_tokens, response_tokens, None if finished is None else int(finished), source, now_iso(),
                 run_id, run_step, run_checkpoint])
            return cur.lastrowid

    def response(self, response_id: int) -> dict[str, Any]:
        rows = self._query("SELECT * FROM responses WHERE id = ?", [response_id])
        if not rows:
            raise StoreError(f"no response with id {response_id}")
        row = rows[0]
        row["sampling"] = json.loads(row["sampling"]) if row["sampling"] else None
        return row

    def response_count(self, prompt_id: int) -> int:
        """Answers stored for a prompt (the engine derives fresh sampling seeds from it)."""
        return self._query("SELECT COUNT(*) AS n FROM responses WHERE prompt_id = ?", [prompt_id])[0]["n"]

    # -- comparisons -------------------------------------------------------------------------

    def add_comparison(self, prompt_id: int, response_a_id: int, response_b_id: int, choice: str, *,
                       annotator: str | None = None, note: str | None = None, decision_ms: int | None = None,
                       margin: float | None = None, source: str = "label", repeat_of: int | None = None) -> int:
        """Record one decision; `response_a_id` is the answer shown on the left (side A). `repeat_of`: the
        decision this one repeats (the same pair shown again, sides swapped). When a reward run scored both
        answers as they were served, its margin on the decision is stored with it (`reward_margin`)."""
        if choice not in CHOICES:
            raise StoreError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self.transaction():
            cur = self.db.execute(
                """INSERT INTO comparisons (prompt_id, response_a_id, response_b_id, choice, margin, annotator,
                   note, decision_ms, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [prompt_id, response_a_id, response_b_id, choice, margin, annotator, note, decision_ms, source,
                 now_iso()])
            self._record_reward_verdict(cur.lastrowid, response_a_id, response_b_id, choice, repeat_of)
            return cur.lastrowid

    def _record_reward_verdict(self, comparison_id: int, response_a_id: int, response_b_id: int, choice: str,
                               repeat_of: int | None) -> None:
        """Store the repeat link and the margin of the latest reward run that scored both answers."""
        scored = self._query("""
            SELECT sa.reward_run, sa.score AS score_a, sb.score AS score_b FROM response_scores sa
            JOIN response_scores sb ON sb.reward_run = sa.reward_run AND sb.response_id = ?
            WHERE sa.response_id = ? ORDER BY sa.rowid DESC LIMIT 1""", [response_b_id, response_a_id])
        verdict = scored[0] if scored else None
        margin = reward_margin(verdict["score_a"], verdict["score_b"], choice) if verdict else None
        self.db.execute("UPDATE comparisons SET repeat_of = ?, reward_run = ?, reward_margin = ? WHERE id = ?",
                        [repeat_of, verdict["reward_run"] if verdict else None, margin, comparison_id])

    def delete_comparison(self, comparison_id: int) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM comparisons WHERE id = ?", [comparison_id])

    def set_comparison_note(self, comparison_id: int, note: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE comparisons SET note = ? WHERE id = ?", [note, comparison_id])

    def comparisons(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM comparisons ORDER BY id")

    def labeled_decisions(self) -> list[dict[str, Any]]:
        """Decisions made by labeling (blind sides), oldest first; imported pairs are left out: their side A is
        always the chosen answer, so they say nothing about annotators."""
        return self._query("""
            SELECT id, annotator, prompt_id, response_a_id, response_b_id, choice, decision_ms, repeat_of
            FROM comparisons WHERE source = 'label' ORDER BY id""")

    # -- label quality: the reward model's verdicts, repeated pairs ----------------------------------

    def add_response_scores(self, reward_run: str, scores: dict[int, float]) -> None:
        """A reward run's scores of answers ({response id: standardised score}), as they were served."""
        with self.transaction():
            self.db.conn.executemany(
                "INSERT INTO response_scores (response_id, reward_run, score) VALUES (?, ?, ?) "
                "ON CONFLICT (response_id, reward_run) DO UPDATE SET score = excluded.score",
                [(response_id, reward_run, float(score)) for response_id, score in scores.items()])

    def reward_margins(self, limit: int, reward_run: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` labeled decisions the reward model judged (id, choice, reward_run, reward_margin;
        newest first), of one reward run when named."""
        run_filter = "AND reward_run = ?" if reward_run else ""
        return self._query(f"""
            SELECT id, choice, reward_run, reward_margin FROM comparisons
            WHERE source = 'label' AND reward_margin IS NOT NULL {run_filter} ORDER BY id DESC LIMIT ?""",
                           [*([reward_run] if reward_run else []), limit])

    def repeat_candidate(self, seed: int, exclude: Iterable[int] = ()) -> dict[str, Any] | None:
        """A labeled decision to show again for self-consistency: a judged one (not a skip) that is neither a
        repeat nor repeated yet nor in `exclude` (repeats served but not decided yet), drawn by `seed`; with its
        prompt and both answers' texts and lengths."""
        excluded = set(exclude)
        rows = [row for row in self._query("""
            SELECT c.id, c.prompt_id, c.response_a_id, c.response_b_id FROM comparisons c
            WHERE c.source = 'label' AND c.choice != 'skip' AND c.repeat_of IS NULL
              AND NOT EXISTS (SELECT 1 FROM comparisons r WHERE r.repeat_of = c.id) ORDER BY c.id""")
                if row["id"] not in excluded]
        if not rows:
            return None
        row = random.Random(seed).choice(rows)
        for side in ("a", "b"):
            response = self.response(row[f"response_{side}_id"])
            row[f"text_{side}"], row[f"tokens_{side}"] = response["text"], response["response_tokens"]
        return row

    def preference_pairs(self, include_ties: bool = False, include_eval: bool = False) -> list[dict[str, Any]]:
        """Decided comparisons as chosen/rejected pairs (ties only if asked; both_bad and skip never). Decisions
        on blind evaluation pairs only if asked: they judge a trained policy, and training on them would leak it.

        For ties, `chosen` is side A and `rejected` side B; `choice` says it was a tie. A repeated pair's second
        decision is left out (it measures the annotator's self-consistency; the first one counts).
        """
        choices = ["a", "b"] + (["tie"] if include_ties else [])
        rows = self._query(f"""
            SELECT c.id, c.prompt_id, c.choice, c.margin, c.annotator, c.source,
                   p.text AS prompt, p.messages AS prompt_messages,
                   ra.text AS text_a, rb.text AS text_b, c.response_a_id, c.response_b_id
            FROM comparisons c
            JOIN prompts p ON p.id = c.prompt_id
            JOIN responses ra ON ra.id = c.response_a_id
            JOIN responses rb ON rb.id = c.response_b_id
            WHERE c.choice IN ({", ".join("?" for _ in choices)}) AND (c.eval_pair_id IS NULL OR ?)
              AND c.repeat_of IS NULL
            ORDER BY c.id""", [*choices, include_eval])
        pairs = []
        for r in rows:
            b_wins = r["choice"] == "b"
            pairs.append({
                "comparison_id": r["id"], "prompt_id": r["prompt_id"], "prompt": r["prompt"],
                "prompt_messages": json.loads(r["prompt_messages"]) if r["prompt_messages"] else None,
                "chosen": r["text_b"] if b_wins else r["text_a"],
                "rejected": r["text_a"] if b_wins else r["text_b"],
                "chosen_id": r["response_b_id"] if b_wins else r["response_a_id"],
                "rejected_id": r["response_a_id"] if b_wins else r["response_b_id"],
                "choice": r["choice"], "margin": r["margin"], "annotator": r["annotator"], "source": r["source"],
            })
        return pairs

