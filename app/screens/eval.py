"""The Eval screen: blind evaluation of a PPO checkpoint against the reference or another run.

Choose the checkpoint (any a PPO run keeps: its newest `ppo.keep_checkpoints`), the opponent, a prompt tag and how
many pairs; `enter` asks the engine to sample the pairs (rlhf.evaluation, in the engine process). Then each pair
shows one answer per system, sides randomized and identities hidden, decided with the Label screen's keys; every
decision is committed before the next pair shows. When the last pair is decided (or `e` ends the session early) the
screen reveals which side was which system, and the checkpoint's win rate with ties and its 95% Wilson interval.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical, VerticalScroll
from textual.widgets import Footer, Header, Input, Label, ProgressBar, Select, Static

from rlhf.engine import protocol
from rlhf.errors import RlhfError
from rlhf.evaluation import (DEFAULT_EVAL_PAIRS, REFERENCE, describe_result, eval_report, kept_checkpoints,
                             outcome_summary, session_outcomes)
from rlhf.win_rate import eval_outcome

from ..widgets.answer import TextPane
from .base import RlhfScreen
from .label import decision_bindings, decision_ms, early_key_refusal, event_clock

REFERENCE_OPTION = ("reference (adapters off)", REFERENCE)
NEW_SESSION = "new"
NEW_SESSION_OPTION = ("a new session (the settings below)", NEW_SESSION)
CHOICE_WORDS = {"a": "A better", "b": "B better", "tie": "tie", "both_bad": "both bad", "skip": "skipped"}


def checkpoint_options(kept: dict[str, list[int]]) -> list[tuple[str, tuple[str, int]]]:
    """(label, (run id, step)) of every kept checkpoint, from `kept` (each PPO run's kept steps, oldest run and
    step first): what can be evaluated, the newest run first and its newest checkpoint first."""
    return [(f"{run_id} @ step {step}", (run_id, step)) for run_id, steps in reversed(kept.items())
            for step in reversed(steps)]


def opponent_options(kept: dict[str, list[int]]) -> list[tuple[str, str]]:
    """(label, run id) of the reference, then of each PPO run with a kept checkpoint at its latest, newest first."""
    return [REFERENCE_OPTION, *((f"{run_id} @ step {steps[-1]} (its latest checkpoint)", run_id)
                                for run_id, steps in reversed(kept.items()) if steps)]


def session_options(sessions: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, session id) of each session with pairs left to label, newest first (e.g. made by `eval prepare`),
    then a new session."""
    unfinished = [(f"{s['id']}: {s['candidate']} vs {s['opponent']}, {s['decided']} of {s['pairs']} labeled", s["id"])
                  for s in reversed(sessions) if s["decided"] < s["pairs"]]
    return [*unfinished, NEW_SESSION_OPTION]


def reveal_lines(pairs: list[dict[str, Any]], candidate: str, opponent: str) -> list[str]:
    """One line per decided pair once the session ends: what was chosen, which system each side was, the outcome."""
    lines = []
    for number, pair in enumerate(pairs, 1):
        if pair["choice"] is None:
            continue
        a, b = (candidate, opponent) if pair["candidate_side"] == "a" else (opponent, candidate)
        outcome = eval_outcome(pair["choice"], pair["candidate_side"]) or "not counted"
        lines.append(f"{number:>3}. {CHOICE_WORDS[pair['choice']]:<9} A = {a}, B = {b}: {outcome}")
    return lines


class EvalScreen(RlhfScreen):
    DEFAULT_CSS = """
    EvalScreen #eval-setup { height: auto; padding: 1 2; }
    EvalScreen #eval-setup Horizontal, EvalScreen .eval-row { height: auto; }
    EvalScreen .eval-field { width: 1fr; height: auto; }
    EvalScreen #eval-message { padding: 1 2; height: auto; }
    EvalScreen #eval-prompt { height: auto; max-height: 30%; border: round $secondary; }
    EvalScreen #eval-answers { layout: grid; grid-size: 2 1; height: 1fr; }
    EvalScreen #eval-reveal { padding: 1 2; }
    EvalScreen #eval-status { height: auto; padding: 0 1; background: $panel; color: $text-muted; }
    """
    # The Label screen's decision keys, under the same binding ids so that a `[label] keymap` remaps both (a strong
    # preference counts as a plain one here); priority so that arrows decide, off while the form is showing.
    BINDINGS = [
        *decision_bindings(strong_as_plain=True),
        Binding("e", "end", "end + reveal", id="eval_end", priority=True),
        Binding("enter", "prepare", "prepare pairs", id="eval_prepare"),  # not priority: a Select opens with it
        Binding("n", "new", "new session", id="eval_new", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.stage = "setup"  # setup -> preparing -> labeling -> revealed
        self.session: dict[str, Any] | None = None
        self.pairs: list[dict[str, Any]] = []
        self.position = 0
        self.history: list[tuple[int, int]] = []  # (pair index, comparison id), for undo
        self.shown_at: float | None = None
        self.message = ""

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="eval-setup"):
            yield Label("Session")
            yield Select([NEW_SESSION_OPTION], id="eval-session", allow_blank=False)
            yield Label("Checkpoint to evaluate")
            yield Select([], id="eval-checkpoint", prompt="no PPO run with a checkpoint yet")
            yield Label("Against")
            yield Select([REFERENCE_OPTION], id="eval-against", allow_blank=False)
            with Container(classes="eval-row"):
                yield Label("Held-out prompts with tag (empty: any prompt the run never drew)")
                yield Input(id="eval-tag", placeholder="any")
                yield Label("Pairs")
                yield Input(str(DEFAULT_EVAL_PAIRS), id="eval-count", type="integer")
            yield Static("", id="eval-results", markup=False)
        yield Static("", id="eval-message", markup=False)
        yield ProgressBar(total=1.0, show_eta=False, id="eval-progress")
        yield TextPane("prompt", id="eval-prompt")
        with Container(id="eval-answers"):
            yield TextPane("A", id="eval-answer-a")
            yield TextPane("B", id="eval-answer-b")
        yield VerticalScroll(Static("", id="eval-reveal-text", markup=False), id="eval-reveal")
        yield Static("", id="eval-status", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = "rlhf-tui · eval"
        self.app.subscribe_engine(self.handle_engine_events)
        self.refresh_choices()
        self._redraw()
        self.query_one("#eval-count", Input).focus()  # enter there prepares (a focused Select would open instead)

    def on_screen_resume(self) -> None:
        if self.stage == "setup":
            self.refresh_choices()  # a run may have finished since

    def refresh_choices(self) -> None:
        """Fill the session, checkpoint and opponent lists from the store (the newest unfinished session first), and
        the results so far."""
        sessions = self.app.store.eval_sessions()
        session = self.query_one("#eval-session", Select)
        session.set_options(session_options(sessions))
        session.value = session_options(sessions)[0][1]
        results = [describe_result(row) for row in eval_report(self.app.store)]
        self.query_one("#eval-results", Static).update(
            "\n".join(["Results so far (every session, per checkpoint):", *results]) if results else "")
        kept = {run.id: kept_checkpoints(self.app.workspace, run) for run in self.app.store.runs("ppo")}
        options = checkpoint_options(kept)
        checkpoint = self.query_one("#eval-checkpoint", Select)
        chosen = checkpoint.value
        checkpoint.set_options(options)
        if options:
            checkpoint.value = chosen if chosen in {value for _, value in options} else options[0][1]
        self.query_one("#eval-against", Select).set_options(opponent_options(kept))

    # -- engine ----------------------------------------------------------------------------------

    def handle_engine_events(self, events: list[protocol.Event]) -> None:
        if not self.is_attached or self.stage != "preparing":
            return
        for event in events:
            if isinstance(event, protocol.Status) and event.stage == "eval":
                self.message = event.message
                self.query_one("#eval-progress", ProgressBar).update(progress=event.progress or 0.0)
            elif isinstance(event, protocol.Status) and event.stage == protocol.STARTING:
                self._back_to_setup("the engine restarted: its evaluation request is lost; press enter again")
            elif isinstance(event, protocol.EvalReady):
                self.open_session(event.session_id)
                return
            elif isinstance(event, protocol.Error) and (event.fatal or event.is_about(protocol.PrepareEval)):
                self._back_to_setup(event.message)
        self._redraw()

    def _back_to_setup(self, message: str) -> None:
        # Said above the form; no toast: the Label screen already toasts every failed request.
        self.stage, self.message = "setup", message

    # -- actions ---------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # A key of another stage is off (and hidden): the form's text fields get their letters.
        stage_of = {"decide": "labeling", "undo": "labeling", "end": "labeling", "prepare": "setup",
                    "new": "revealed"}
        return stage_of.get(action, self.stage) == self.stage

    def on_input_submitted(self) -> None:
        self.action_prepare()  # enter in a text field

    def action_prepare(self) -> None:
        """Continue the chosen session, or ask the engine for a new one with the form's settings."""
        session = self.query_one("#eval-session", Select).value
        if session != NEW_SESSION:
            self.open_session(str(session))
            return
        checkpoint = self.query_one("#eval-checkpoint", Select)
        if checkpoint.is_blank():
            self.notify("no PPO run with a checkpoint: train one on the Train screen first", severity="error")
            return
        count_text = self.query_one("#eval-count", Input).value.strip()
        if not count_text.isdigit() or int(count_text) < 1:
            self.notify(f"pairs must be a whole number of at least 1, got {count_text!r}", severity="error")
            return
        tag = self.query_one("#eval-tag", Input).value.strip() or None
        against = self.query_one("#eval-against", Select).value
        run_id, step = checkpoint.value
        request = protocol.PrepareEval(run_id=run_id, checkpoint=step, against=str(against), prompt_tag=tag,
                                       count=int(count_text))
        if not self.app.engine.send(request):
            self.notify("the engine is not running: ctrl+r restarts it", severity="error")
            return
        self.stage, self.message = "preparing", "asking the engine for blind pairs…"
        if self.app.engine.running_runs:
            self.message += " (it samples them once the run in progress ends)"
        self._redraw()

    def open_session(self, session_id: str) -> None:
        """Label the session's undecided pairs from the first one on (reveal at once if none is left)."""
        self.session = next(s for s in self.app.store.eval_sessions() if s["id"] == session_id)
        self.pairs = self.app.store.eval_pairs(session_id)
        self.history = []
        self.position = next((i for i, pair in enumerate(self.pairs) if pair["choice"] is None), len(self.pairs))
        self.stage = "labeling"
        self.set_focus(None)  # the form's fields must not take the decision keys
        self._advance()

    def action_decide(self, choice: str) -> None:
        pair = self.pairs[self.position]
        refusal = early_key_refusal(self.shown_at, self.app.last_key_at)
        if refusal is not None:
            self.app.bell()
            self.notify(refusal, severity="warning", timeout=3)
            return
        try:
            comparison_id = self.app.store.add_eval_decision(
                pair["id"], choice, annotator=self.app.annotator,
                decision_ms=decision_ms(self.shown_at, self.app.last_key_at))
        except RlhfError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        pair["choice"] = choice
        self.history.append((self.position, comparison_id))
        self._advance()

    def action_undo(self) -> None:
        if not self.history:
            self.app.bell()
            return
        index, comparison_id = self.history.pop()
        try:
            self.app.store.delete_comparison(comparison_id)
        except RlhfError as exc:
            self.history.append((index, comparison_id))
            self.notify(str(exc), severity="error", timeout=10)
            return
        self.pairs[index]["choice"] = None
        self.position = index
        self._show_pair()

    def action_end(self) -> None:
        self.stage = "revealed"
        self._redraw()

    def action_new(self) -> None:
        self.stage, self.session, self.pairs, self.message = "setup", None, [], ""
        self.refresh_choices()
        self._redraw()
        self.query_one("#eval-count", Input).focus()

    def _advance(self) -> None:
        """Show the next undecided pair, or reveal once every pair is decided."""
        self.position = next((i for i in range(self.position, len(self.pairs)) if self.pairs[i]["choice"] is None),
                             len(self.pairs))
        if self.position == len(self.pairs):
            self.action_end()
        else:
            self._show_pair()

    def _show_pair(self) -> None:
        pair = self.pairs[self.position]
        self.query_one("#eval-prompt", TextPane).show(pair["prompt"])
        self.query_one("#eval-answer-a", TextPane).show(pair["text_a"], f"{pair['tokens_a'] or 0} tokens")
        self.query_one("#eval-answer-b", TextPane).show(pair["text_b"], f"{pair['tokens_b'] or 0} tokens")
        self.shown_at = None
        self._redraw()
        self.call_after_refresh(self._mark_shown)

    def _mark_shown(self) -> None:
        self.shown_at = event_clock()

    # -- drawing ---------------------------------------------------------------------------------

    def _redraw(self) -> None:
        stage = self.stage
        self.query_one("#eval-setup").display = stage == "setup"
        message = self.query_one("#eval-message", Static)
        message.display = stage in ("setup", "preparing") and bool(self.message)
        message.update(self.message)
        self.query_one("#eval-progress").display = stage == "preparing"
        for widget in ("#eval-prompt", "#eval-answers"):
            self.query_one(widget).display = stage == "labeling"
        self.query_one("#eval-reveal").display = stage == "revealed"
        if stage == "revealed":
            self.query_one("#eval-reveal-text", Static).update(self.reveal_text())
        self.query_one("#eval-status", Static).update(self._status_line())
        self.refresh_bindings()

    def reveal_text(self) -> str:
        """The session's result and, pair by pair, which system each side was."""
        assert self.session is not None
        session = self.session
        summary = outcome_summary(session_outcomes(self.app.store, session["id"]))
        decided = sum(pair["choice"] is not None for pair in self.pairs)
        row = {**summary, "candidate": session["candidate"], "opponent": session["opponent"], "decided": decided,
               "pairs": len(self.pairs)}
        overall = [f"{len(total['sessions'])} sessions together: {describe_result(total)}"
                   for total in eval_report(self.app.store) if len(total["sessions"]) > 1
                   and (total["candidate"], total["opponent"]) == (session["candidate"], session["opponent"])]
        lines = [f"Session {session['id']} (seed {session['seed']}): identities revealed", "", describe_result(row),
                 *overall,
                 "", *reveal_lines(self.pairs, session["candidate"], session["opponent"]), "",
                 "n: another session; `rlhf-tui eval report` prints every checkpoint's result"]
        return "\n".join(lines)

    def _status_line(self) -> str:
        if self.stage == "labeling":
            decided = sum(pair["choice"] is not None for pair in self.pairs)
            return (f"pair {self.position + 1} of {len(self.pairs)} · {decided} decided · session "
                    f"{self.session['id'] if self.session else ''} · systems hidden until the end (e ends early)")
        if self.stage == "setup":
            return ("enter: label the chosen session, or sample a new one's blind pairs (one answer from the "
                    "checkpoint, one from the opponent, sides at random)")
        return f"annotator {self.app.annotator}"
