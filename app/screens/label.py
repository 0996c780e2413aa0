"""The label screen: a prompt, two blind answers, one key per decision.

Every decision is committed to SQLite here, in the UI process, before the next pair is shown: the
engine only ever samples and stores answers. Pairs come from the engine ahead of time (prefetch).

A note (`n`) belongs to the pair on screen and is stored with the decision made on it; undoing a
decision brings its pair and its note back.

A decision key counts only for a pair the person could read: its prompt and both answers on screen
(painted, each with at least one line visible) for MIN_LOOK_MS before the key was pressed, the key's time
taken from its event. Faster keys, keys typed before the pair was painted (e.g. queued while the UI
stalled) and keys on a terminal too small to show the panes are dropped with a notice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical
from textual.widgets import Header, ProgressBar, Static

try:  # the clock Textual stamps key events with; a private module, so a rename must not stop the app
    from textual._time import get_time as event_clock
except ImportError:  # pragma: no cover - Textual's choice on every platform but Windows
    from time import monotonic as event_clock

from rlhf.engine import protocol
from rlhf.errors import RlhfError

from ..widgets.answer import TextPane
from ..widgets.footer import FittingFooter
from .base import RlhfScreen
from .dialogs import NO_GUIDELINES, HelpScreen, NoteModal

STRONG_MARGIN = 1.0  # stored as trl's `margin` for a shift+A / shift+B decision; a normal one stores None
STRONG_KEYS = Binding.Group("strong")  # one footer item, "A B strong": the two show (or are left out) together
SCROLL_LINES = 3
# Human visual reaction time is about 200 ms: a key within 250 ms of the pair appearing was typed before
# it could be read (a held or typed-ahead key), yet no real reading of two answers is that fast.
MIN_LOOK_MS = 250
NOTE_PREVIEW_CHARS = 60
REFUSAL_TOAST_S = 3.0


@dataclass
class Decision:
    comparison_id: int
    pair: protocol.PairReady
    note: str | None


def decision_ms(shown_at: float, decided_at: float) -> int:
    """Decision time: milliseconds from the pair being shown to the deciding key (monotonic clock)."""
    return max(0, round((decided_at - shown_at) * 1000))


def early_key_refusal(visible_since: float | None, key_at: float, min_look_ms: int = MIN_LOOK_MS) -> str | None:
    """Why a decision key pressed at `key_at` does not count for a pair fully visible since `visible_since`
    (None: not painted whole yet), or None when it counts: at least `min_look_ms` after it appeared."""
    if visible_since is None or key_at < visible_since:
        return "key dropped: it was typed before this pair was on screen; read the pair, then decide"
    if decision_ms(visible_since, key_at) < min_look_ms:
        return f"too fast: look at the pair first (a decision counts {min_look_ms} ms after the pair shows)"
    return None


def note_preview(note: str, limit: int = NOTE_PREVIEW_CHARS) -> str:
    """A note as one short line for the notice bar: its first line, cut to `limit` characters, and how many
    lines it has (the whole note is stored)."""
    lines = note.splitlines() or [""]
    first = lines[0] if len(lines[0]) <= limit else lines[0][:limit - 1] + "…"
    return first if len(lines) == 1 else f"{first} (+{len(lines) - 1} more lines)"


def pairs_to_request(prefetch: int, held: int, requested: int) -> int:
    """Pairs to ask the engine for: enough for the one on screen plus `prefetch` ready ones.

    `held` counts the pair on screen and the queued ones; nothing is asked while a request is still
    being answered (`requested` > 0), so the exclude list of the next request is always complete.
    """
    if requested > 0:
        return 0
    return max(0, 1 + prefetch - held)


def pair_policy(pair: protocol.PairReady | None, info: protocol.Ready) -> str:
    """Which policy sampled the pair on screen: a PPO run's, during the run, or the labeling model's."""
    if pair is not None and pair.run_id is not None:
        return f"{pair.run_id} after step {pair.run_step}"
    return "base + policy adapter" if info.adapter else "base"


def sampling_summary(sampling: dict) -> str:
    top_k = sampling.get("top_k") or "off"
    return (f"T {sampling.get('temperature')} · top-k {top_k} · top-p {sampling.get('top_p')} · "
            f"max {sampling.get('max_new_tokens')} tok · rep {sampling.get('repetition_penalty')}")


def decision_bindings(strong_as_plain: bool = False) -> list[Binding]:
    """The decision keys and undo, priority so that arrows decide. `strong_as_plain`: `A` and `B` decide as a plain
    preference (the Eval screen stores no margin) instead of being keys of their own."""
    strong_a, strong_b = (",A", ",B") if strong_as_plain else ("", "")
    return [
        Binding(f"a,1,left{strong_a}", "decide('a')", "A better", id="prefer_a", priority=True),
        Binding(f"b,2,right{strong_b}", "decide('b')", "B better", id="prefer_b", priority=True),
        Binding("t,equals_sign", "decide('tie')", "tie", id="tie", priority=True),
        Binding("x,0", "decide('both_bad')", "both bad", id="both_bad", priority=True),
        Binding("s,space", "decide('skip')", "skip", id="skip", priority=True),
        Binding("u,backspace", "undo", "undo", id="undo", priority=True),
    ]


class LabelScreen(RlhfScreen):
    # priority: the answer panes scroll with arrows, but here arrows decide. The order is the footer's order of
    # importance (the app's keys follow): the decisions, undo and help always show (FOOTER_KEEPS); the keys after
    # them leave the footer, from the end, where the terminal is too narrow (at 80 columns: resample, note, refit
    # and tab) and keep working. Descriptions are short, so that all fit 120 columns; the help (`?`) shows each
    # tooltip in full.
    BINDINGS = [
        *decision_bindings(),
        Binding("question_mark", "help", "help", id="help", priority=True,
                tooltip="help: the guidelines and every key"),
        Binding("A", "decide('a', True)", "strong", id="strong_a", priority=True, group=STRONG_KEYS,
                tooltip=f"A much better (stored with margin {STRONG_MARGIN})"),
        Binding("B", "decide('b', True)", "strong", id="strong_b", priority=True, group=STRONG_KEYS,
                tooltip=f"B much better (stored with margin {STRONG_MARGIN})"),
        Binding("r", "regenerate", "resample", id="regenerate", priority=True,
                tooltip="regenerate: two fresh answers to this prompt"),
        Binding("n", "note", "note", id="note", priority=True),
        Binding("f", "refit", "refit", id="refit", priority=True,
                tooltip="refit the reward model on every label so far (while a PPO run trains)"),
        Binding("up", "scroll(-1)", "scroll up", id="scroll_up", show=False),
        Binding("down", "scroll(1)", "scroll down", id="scroll_down", show=False),
        Binding("pageup", "scroll(-10)", "page up", id="page_up", show=False),
        Binding("pagedown", "scroll(10)", "page down", id="page_down", show=False),
    ]
    # Never left out of the footer while another key could go instead; restart (an app key) shows only while the
    # engine is down or stuck, and then it is the key that matters.
    FOOTER_KEEPS = ("prefer_a", "prefer_b", "tie", "both_bad", "skip", "undo", "help", "restart_engine")

    def __init__(self) -> None:
        super().__init__()
        self.current: protocol.PairReady | None = None
        self.queue: deque[protocol.PairReady] = deque()
        self.history: list[Decision] = []
        self.requested = 0
        self.regenerating: int | None = None  # prompt id whose fresh pair is on its way
        self.pending_note: str | None = None
        self.visible_since: float | None = None  # when the pair on screen was first painted whole
        self._last_refusal = ("", 0.0)  # the latest "key did not count" notice and when it was shown
        self.labeled_session = 0
        self.labeled_total = 0
        self.engine_info: protocol.Ready | None = None
        self.engine_status: protocol.Status | None = None
        self.engine_error: str | None = None
        self.engine_silence: str | None = None  # why the engine seems stuck (it stopped answering pings)
        self.ppo_run: str | None = None  # the PPO run training now: its pairs come from its policy; `f` refits
        self.refit: protocol.RefitStatus | None = None  # the latest word on a refit of that run

    def compose(self) -> ComposeResult:
        yield Header()
        yield TextPane("prompt", id="prompt")
        with Vertical(id="answer-area"):  # the room left; the panes take what their answers need of it
            with Container(id="answers"):
                yield TextPane("A", id="answer-a")
                yield TextPane("B", id="answer-b")
        with Vertical(id="engine-panel"):
            yield Static("", id="engine-message", markup=False)
            yield ProgressBar(total=1.0, show_eta=False, id="engine-progress")
        yield Static("", id="notice", markup=False)
        yield Static("", id="status", markup=False)
        # No "^p palette" here: with it, 120 columns cannot hold every key. ctrl+p still opens it (listed in help).
        yield FittingFooter(order=[binding.id for binding in self.BINDINGS], keep=self.FOOTER_KEEPS,
                            show_command_palette=False)

    def on_mount(self) -> None:
        self.title = "rlhf-tui · label"
        self.labeled_total = self.app.store.stats()["comparisons"]
        self.app.subscribe_engine(self.handle_engine_events)
        self._render_pair()
        guidelines, problem = self.app.guidelines()
        if problem is not None:
            self.notify(problem, severity="warning", timeout=15)
        elif guidelines is not None and self.labeled_total == 0:
            self.action_help()

    # -- engine events ---------------------------------------------------------------------------

    def handle_engine_events(self, events: list[protocol.Event]) -> None:
        if not self.is_attached:
            return  # the app is closing: its widgets are being taken apart while the engine still talks
        for event in events:
            if isinstance(event, protocol.Status):
                self.engine_status = event
                if event.stage == protocol.STARTING:  # a fresh engine: nothing asked of the old one will come
                    self.requested, self.regenerating = 0, None
                    self.engine_info, self.engine_error, self.engine_silence = None, None, None
            elif isinstance(event, protocol.Ready):
                self.engine_info, self.engine_error = event, None
            elif isinstance(event, protocol.PairReady):
                self._receive_pair(event)
            elif isinstance(event, protocol.Error):
                self._receive_error(event)
            elif isinstance(event, protocol.Responding):
                self.engine_silence = None if event.responding else event.message
            elif isinstance(event, protocol.Warning) and event.run_id is None:  # a run's: its screen shows it
                self.notify(event.message, severity="warning")
            elif isinstance(event, (protocol.RunStarted, protocol.RunEnded, protocol.RefitStatus)):
                self._follow_run(event)
        self._request_pairs()
        self._render_pair()

    def _follow_run(self, event: protocol.RunStarted | protocol.RunEnded | protocol.RefitStatus) -> None:
        """Which PPO run is training (the refit key works only then), and how its refit goes."""
        if isinstance(event, protocol.RunStarted):
            if event.kind == "ppo":
                self.ppo_run, self.refit = event.run_id, None
        elif isinstance(event, protocol.RunEnded):
            if event.run_id == self.ppo_run:
                self.ppo_run = None
        else:
            if event.stage != "training" or self.refit is None or self.refit.stage != "training":
                self.notify(event.message, title=f"refit {event.stage}", timeout=8,
                            severity="warning" if event.stage == "failed" else "information")
            self.refit = event
        self.refresh_bindings()

    def _receive_pair(self, pair: protocol.PairReady) -> None:
        if pair.regenerated:
            self.regenerating = None
            if self.current is not None and self.current.prompt_id == pair.prompt_id:
                self._show(pair, note=self.pending_note)
            return  # a decision was made meanwhile: the fresh answers stay stored, unshown
        self.requested = max(0, self.requested - 1)
        if self.current is None:
            self._show(pair)
        else:
            self.queue.append(pair)

    def _receive_error(self, error: protocol.Error) -> None:
        if error.fatal:
            self.engine_error, self.engine_info = error.message, None
            self.requested, self.regenerating = 0, None
            self.notify(f"{error.message}\nctrl+r restarts the engine", severity="error", timeout=10)
            return
        if error.is_about(protocol.Refit):
            self.refit = None  # no PPO run took it: the key works again when one trains
        if error.is_about(protocol.NeedPairs):
            self.requested = 0  # the engine dropped the rest of that request
        elif error.is_about(protocol.Regenerate):
            self.regenerating = None
        elif error.is_about(protocol.StartReward, protocol.StartPPO):
            return  # the Reward and Train screens report their runs' failures
        self.notify(error.message, severity="error", timeout=8)

    def _request_pairs(self) -> None:
        if self.engine_info is None:
            return
        held = (self.current is not None) + len(self.queue)
        count = pairs_to_request(self.app.config.sampling.prefetch, held, self.requested)
        if count and self.app.engine.send(protocol.NeedPairs(count, self._held_prompt_ids())):
            self.requested = count

    def _held_prompt_ids(self) -> tuple[int, ...]:
        held = ([self.current] if self.current else []) + list(self.queue)
        return tuple(dict.fromkeys(p.prompt_id for p in held))

    # -- decisions -------------------------------------------------------------------------------

    def action_decide(self, choice: str, strong: bool = False) -> None:
        pair = self.current
        if pair is None:
            self.app.bell()
            return
        refusal = (self._unreadable_reason() if not self._panes_readable()
                   else early_key_refusal(self.visible_since, self.app.last_key_at))
        if refusal is not None:
            self.app.bell()
            self._refused(refusal)
            return
        elapsed = decision_ms(self.visible_since, self.app.last_key_at)
        if not self.app.ensure_database_on_disk():
            return
        try:
            comparison_id = self.app.store.add_comparison(
                pair.prompt_id, pair.a.id, pair.b.id, choice, annotator=self.app.annotator,
                note=self.pending_note, decision_ms=elapsed, margin=STRONG_MARGIN if strong else None,
                repeat_of=pair.repeat_of)
        except RlhfError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        self.history.append(Decision(comparison_id, pair, self.pending_note))
        self.labeled_session += 1
        self.labeled_total += 1
        self._show(self.queue.popleft() if self.queue else None)
        self._request_pairs()

    def _refused(self, message: str) -> None:
        """Say why a key did not decide; once per REFUSAL_TOAST_S, so that a held key does not bury the pair
        under a stack of toasts."""
        now = event_clock()
        last_message, last_at = self._last_refusal
        if message == last_message and now - last_at < REFUSAL_TOAST_S:
            return  # that notice is still on screen
        self.notify(message, severity="warning", timeout=REFUSAL_TOAST_S)
        self._last_refusal = (message, now)

    def action_undo(self) -> None:
        if not self.history:
            self.app.bell()
            return
        decision = self.history.pop()
        try:
            self.app.store.delete_comparison(decision.comparison_id)
        except RlhfError as exc:
            self.history.append(decision)
            self.notify(str(exc), severity="error", timeout=10)
            return
        self.labeled_session -= 1
        self.labeled_total -= 1
        if self.current is not None:
            self.queue.appendleft(self.current)
        self._show(decision.pair, note=decision.note)
        self.notify("undone: that decision is deleted", timeout=2)

    def action_regenerate(self) -> None:
        if self.current is None or self.regenerating is not None or self.engine_info is None:
            self.app.bell()
            return
        if self.app.engine.send(protocol.Regenerate(self.current.prompt_id)):
            self.regenerating = self.current.prompt_id
            self._render_pair()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "refit":  # only while a PPO run trains: the footer has no room for a key that does nothing
            engine = self.app.engine  # (nor beside ctrl+r, which shows when the engine is down or stuck)
            return self.ppo_run is not None and engine.alive and not engine.unresponsive
        return True

    def action_refit(self) -> None:
        """Train a reward model on every label so far; the PPO run in progress switches to it at its next
        checkpoint (the engine answers with RefitStatus events, shown as notices and in the status line)."""
        if self.ppo_run is None or (self.refit is not None and self.refit.stage == "training"):
            self.app.bell()
            return
        if self.app.engine.send(protocol.Refit()):
            self.refit = protocol.RefitStatus(self.ppo_run, "training", "refit asked for: it starts after this step")
            self.notify(f"refit: a reward model trains on {self.labeled_total} labels after the current step; "
                        f"{self.ppo_run} switches to it at its next checkpoint", timeout=6)
            self._render_pair()

    def action_note(self) -> None:
        if self.current is None:
            self.app.bell()
            return

        def keep(note: str | None) -> None:
            if note is not None:
                self.pending_note = note or None
                self._render_pair()

        self.app.push_screen(NoteModal(self.pending_note), keep)

    def action_help(self) -> None:
        guidelines, problem = self.app.guidelines()
        if guidelines is not None:
            text = guidelines
        elif problem is not None:
            text = f"_The guidelines could not be shown:_ {problem}"
        else:
            text = NO_GUIDELINES.format(name=self.app.config.label.guidelines)
        self.app.push_screen(HelpScreen(text, self._key_list()))

    def action_scroll(self, lines: int) -> None:
        for pane in self.query(TextPane):
            pane.scroll_relative(y=lines * SCROLL_LINES, animate=False)

    def _key_list(self) -> list[tuple[str, str]]:
        """(keys, description) per binding, as remapped by the user's keymap, this screen's first, in the footer's
        order; the tooltip where the footer's description is a short form."""
        rank = {binding.id: i for i, binding in enumerate(self.BINDINGS)}
        by_action: dict[str, list[str]] = {}
        for active in sorted(self.active_bindings.values(), key=lambda active: rank.get(active.binding.id, len(rank))):
            description = active.binding.tooltip or active.binding.description
            by_action.setdefault(description, []).append(self.app.get_key_display(active.binding))
        return [(" ".join(dict.fromkeys(keys)), description) for description, keys in by_action.items()]

    # -- drawing ---------------------------------------------------------------------------------

    def _panes_readable(self) -> bool:
        """The prompt and both answers each show at least one line of their text on screen."""
        return all(pane.content_region.intersection(self.region).height >= 1 for pane in self.query(TextPane))

    def _unreadable_reason(self) -> str:
        width, height = self.app.size
        return (f"enlarge the terminal (now {width}x{height}): the prompt and both answers must be on screen "
                "to decide")

    def _note_visibility(self) -> None:
        """After a refresh: the pair is readable from now on (if it was not already), or no longer."""
        if self.current is None or not self._panes_readable():
            self.visible_since = None
        elif self.visible_since is None:
            self.visible_since = event_clock()

    def visible_ms(self) -> int | None:
        """How long the pair on screen has been fully visible, or None while it is not (keys decide after
        MIN_LOOK_MS)."""
        return None if self.visible_since is None else decision_ms(self.visible_since, event_clock())

    def on_resize(self) -> None:
        self.call_after_refresh(self._note_visibility)  # panes may have moved without a new size

    def on_text_pane_resized(self) -> None:
        """A pane or its text was laid out at a new size: the answer heights follow it, and the pair may have
        become readable (or no longer be). Driven by layout, not by after-refresh callbacks: Textual may run
        those before a newly shown text is laid out, and a pane sized then shows no line of its text, with
        nothing else coming to look again (the pair would stay undecidable)."""
        self._match_answer_heights()
        self._note_visibility()

    def _match_answer_heights(self) -> None:
        """Side by side, both answer panes as tall as the longer answer, so their borders line up (each alone is
        as tall as its own text); stacked, each keeps its own. CSS caps both at the room there is."""
        panes = [self.query_one("#answer-a", TextPane), self.query_one("#answer-b", TextPane)]
        height = None if self.has_class("-narrow") else max(pane.text_height() for pane in panes)
        for pane in panes:
            pane.styles.height = height

    def _show(self, pair: protocol.PairReady | None, note: str | None = None) -> None:
        self.current = pair
        self.pending_note = note
        self.visible_since = None  # set once the new pair has been painted
        if pair is not None:
            self.query_one("#prompt", TextPane).show(pair.prompt_text)
            self.query_one("#answer-a", TextPane).show(pair.a.text, f"{pair.a.tokens} tokens")
            self.query_one("#answer-b", TextPane).show(pair.b.text, f"{pair.b.tokens} tokens")
        self._render_pair()

    def _render_pair(self) -> None:
        pair = self.current
        has_pair = pair is not None
        self.query_one("#prompt").display = has_pair
        self.query_one("#answer-area").display = has_pair
        panel = self.query_one("#engine-panel")
        panel.display = not has_pair
        if not has_pair:
            self._render_engine_panel()
        notices = []
        if pair is not None and pair.notice:
            notices.append(pair.notice)
        if self.regenerating is not None:
            notices.append("regenerating this pair…")
        if self.pending_note:
            notices.append(f"note: {note_preview(self.pending_note)}")
        if self.engine_error and has_pair:
            notices.append(f"engine stopped ({self.engine_error}); ctrl+r restarts it")
        elif self.engine_silence and has_pair:
            notices.append(f"{self.engine_silence}; ctrl+r restarts it")
        notice = self.query_one("#notice", Static)
        notice.update(" · ".join(notices))
        notice.display = bool(notices)
        self.query_one("#status", Static).update(self._status_line())
        self.call_after_refresh(self._note_visibility)

    def _render_engine_panel(self) -> None:
        message = self.query_one("#engine-message", Static)
        progress = self.query_one("#engine-progress", ProgressBar)
        status = self.engine_status
        if self.engine_error:
            message.update(f"The engine stopped: {self.engine_error}\n\nPress ctrl+r to restart it.")
            progress.display = False
        elif self.engine_silence:
            message.update(f"{self.engine_silence[0].upper()}{self.engine_silence[1:]}\n\nPress ctrl+r to restart it.")
            progress.display = False
        elif self.engine_info is None:
            message.update(f"loading model… {status.message if status else ''}")
            progress.display = True
            progress.update(progress=status.progress if status and status.progress is not None else 0.0)
        elif self.app.engine.running_runs:  # the run's hooks sample between its steps
            message.update("the engine is training: the next pair is sampled after the run's current step (after "
                           "the run when the labeling model was freed for it)")
            progress.display = False
        else:
            message.update("sampling the next pair…")
            progress.display = False

    def _status_line(self) -> str:
        parts = [f"labeled {self.labeled_session} this session / {self.labeled_total} total",
                 f"annotator {self.app.annotator}"]
        info = self.engine_info
        if info is not None:
            parts += [f"model {info.model_label} ({pair_policy(self.current, info)})", sampling_summary(info.sampling)]
        parts.append(f"{len(self.queue)} ready")
        if self.refit is not None and self.refit.stage in ("training", "ready"):
            parts.append(f"refit {self.refit.stage}")
        elif self.app.engine.running_runs:
            parts.append("engine training: pairs between its steps")
        return " · ".join(parts)
