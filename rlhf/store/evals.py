"""Blind evaluation sessions: their pairs and the decisions on them (comparisons marked as evaluation)."""

from __future__ import annotations

import json
from typing import Any


from ..errors import StoreError
from .connection import now_iso
from .labels import LabelQueries


class EvalQueries(LabelQueries):
    """Evaluation sessions and their blind pairs."""

    # -- blind evaluation ----------------------------------------------------------------------

    def add_eval_session(self, session: dict[str, Any], pairs: list[dict[str, Any]]) -> str:
        """Store an evaluation session (an `eval_sessions` row without created_at) and its blind pairs (prompt_id,
        response_a_id, response_b_id, candidate_side), together; returns the session id."""
        with self.transaction():
            self.db["eval_sessions"].insert({**session, "sampling": json.dumps(session.get("sampling")),
                                             "created_at": now_iso()})
            self.db["eval_pairs"].insert_all([{**pair, "session_id": session["id"]} for pair in pairs])
        return session["id"]

    def eval_sessions(self) -> list[dict[str, Any]]:
        """Every evaluation session, oldest first, with its pair count and decisions made (skips included)."""
        rows = self._query("""
            SELECT s.*, (SELECT COUNT(*) FROM eval_pairs e WHERE e.session_id = s.id) AS pairs,
                   (SELECT COUNT(*) FROM comparisons c JOIN eval_pairs e ON e.id = c.eval_pair_id
                    WHERE e.session_id = s.id) AS decided
            FROM eval_sessions s ORDER BY s.created_at, s.id""")
        for row in rows:
            row["sampling"] = json.loads(row["sampling"]) if row["sampling"] else None
        return rows

    def eval_pairs(self, session_id: str) -> list[dict[str, Any]]:
        """A session's pairs in order, each with its prompt, both answers' texts and lengths, and its latest
        decision (choice and comparison id, None while undecided)."""
        if not self._query("SELECT 1 FROM eval_sessions WHERE id = ?", [session_id]):
            raise StoreError(f"no evaluation session {session_id!r} (see `rlhf-tui eval report`)")
        return self._query("""
            SELECT e.id, e.prompt_id, e.response_a_id, e.response_b_id, e.candidate_side,
                   p.text AS prompt, p.messages AS prompt_messages,
                   ra.text AS text_a, ra.response_tokens AS tokens_a, rb.text AS text_b, rb.response_tokens AS tokens_b,
                   c.choice, c.id AS comparison_id
            FROM eval_pairs e
            JOIN prompts p ON p.id = e.prompt_id
            JOIN responses ra ON ra.id = e.response_a_id
            JOIN responses rb ON rb.id = e.response_b_id
            LEFT JOIN comparisons c ON c.id = (SELECT MAX(id) FROM comparisons WHERE eval_pair_id = e.id)
            WHERE e.session_id = ? ORDER BY e.id""", [session_id])

    def add_eval_decision(self, eval_pair_id: int, choice: str, *, annotator: str | None = None,
                          note: str | None = None, decision_ms: int | None = None) -> int:
        """Record a decision on a blind evaluation pair: a comparison (source "eval") pointing at the pair."""
        rows = self._query("SELECT prompt_id, response_a_id, response_b_id FROM eval_pairs WHERE id = ?",
                           [eval_pair_id])
        if not rows:
            raise StoreError(f"no evaluation pair with id {eval_pair_id}")
        pair = rows[0]
        with self.transaction():
            comparison_id = self.add_comparison(pair["prompt_id"], pair["response_a_id"], pair["response_b_id"],
                                                choice, annotator=annotator, note=note, decision_ms=decision_ms,
                                                source="eval")
            self.db.execute("UPDATE comparisons SET eval_pair_id = ? WHERE id = ?", [eval_pair_id, comparison_id])
        return comparison_id

