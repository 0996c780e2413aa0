"""What the Reward and Train screens share: a run launched in the engine process, watched live, stopped live.

A subclass names the kind of run it launches (KIND, and REQUEST, its start request's class) and composes a
SettingsForm with id "form" and a "start" button around a RunView with id "panes". This base launches the
request from the form (`action_start`: the app's config with the form's values on top, also on enter in a
field) or resumes a run (`resume`), then follows the engine's events for that kind:
RunStarted adopts the run (also one launched from elsewhere in the app: the command palette, the Runs
list), steps and samples go to the panes, warnings and errors become notifications and status lines.
The Stop key asks for a graceful stop (finish the step, checkpoint); a second press while stopping, or
no stop within `stop_timeout_s`, ends the run hard. If the engine dies, the run is marked interrupted
in the database at once, so the Runs list and a resume see the truth.
"""

from __future__ import annotations

import time
from typing import ClassVar

from textual.binding import Binding
from textual.widgets import Button

from rlhf.config import Config
from rlhf.engine import protocol

from ..widgets.run_feed import RunUpdate, update_from_event
from ..widgets.run_view import RunView
from ..widgets.settings_form import SettingsForm
from .base import RlhfScreen

STOP_TIMEOUT_S = 60.0  # a graceful stop that has not ended the run by then becomes a hard stop
STOP_CHECK_INTERVAL_S = 1.0
WARNING_TOAST_INTERVAL_S = 30.0  # at most one warning notification per this many seconds per screen
GRACEFUL, HARD = "graceful", "hard"
RUN_MODES = {"reward": "reward", "ppo": "train"}  # run kind -> the mode of the screen that launches and stops it


class LiveRunScreen(RlhfScreen):
    KIND: ClassVar[str]  # "reward" or "ppo": the runs this screen launches and watches
    REQUEST: ClassVar[type[protocol.RunRequest]]  # the request that starts (or resumes) one
    LABEL: ClassVar[str]  # how messages name the run, e.g. "PPO"

    BINDINGS = [Binding("s", "stop", "stop", id="stop_run")]

    def __init__(self) -> None:
        super().__init__()
        self.run_id: str | None = None  # the run launched here (or adopted), live or ended
        self.pending = False  # a start request was sent and its RunStarted has not come yet
        self.stop_state: str | None = None  # None, GRACEFUL or HARD
        self.stop_requested_at = 0.0
        self.stop_timeout_s = STOP_TIMEOUT_S
        self._early_warnings: list[tuple[str, str]] = []  # (run id, message) sent before its RunStarted
        self._last_warning_toast = -WARNING_TOAST_INTERVAL_S

    @property
    def view(self) -> RunView:
        return self.query_one("#panes", RunView)

    @property
    def form(self) -> SettingsForm:
        return self.query_one("#form", SettingsForm)

    @property
    def run_active(self) -> bool:
        return self.pending or (self.run_id is not None and not self.view.feed.final)

    def on_mount(self) -> None:
        self.app.subscribe_engine(self.handle_engine_events)
        self.set_interval(STOP_CHECK_INTERVAL_S, self._check_stop_timeout)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.run_active  # hidden while there is nothing to stop
        return True

    # -- hooks for the subclasses ----------------------------------------------------------------

    def show_start_error(self, message: str | None) -> None:
        """Show (or clear, with None) why the last start did not happen, next to the form."""

    def on_run_started(self) -> None:
        """A run of this screen's kind began (its panes now show it)."""

    # -- launching -------------------------------------------------------------------------------

    def action_start(self) -> bool:
        """Launch a run with the app's config and the form's values on top; False when none was launched."""
        config = self.form.chosen_config()
        if config is None:
            self.show_start_error("fix the settings marked above first")
            return False
        return self.launch(self.start_request(config))

    def start_request(self, config: Config) -> protocol.RunRequest:
        """The request that starts a new run of this kind with `config` (a subclass adds what else it chooses)."""
        return self.REQUEST(config)

    def resume(self, run_id: str) -> None:
        """Continue a stopped, failed or interrupted run of this kind from its last checkpoint, with the settings
        it started with; it is adopted like a new one."""
        self.launch(self.REQUEST(self.app.config, resume_run=run_id))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()

    def on_settings_form_submitted(self, event: SettingsForm.Submitted) -> None:
        self.action_start()

    def launch(self, request: protocol.RunRequest) -> bool:
        """Send a start request; the run is adopted when its RunStarted arrives."""
        if self.run_active:
            self.notify(f"a {self.LABEL} run is in progress: stop it first (s)", severity="warning")
            return False
        if not self.app.engine.send(request):
            self.notify("the engine is not running: ctrl+r restarts it", severity="error")
            return False
        self.run_id, self.pending, self.stop_state = None, True, None
        self.sub_title = ""
        self._early_warnings.clear()
        self.show_start_error(None)
        self.view.show_nothing(f"starting {self.LABEL}: loading the models in the engine…")
        self.set_focus(None)  # keys (s to stop) go to the screen, not into a form field
        self.refresh_bindings()
        return True

    # -- engine events ---------------------------------------------------------------------------

    def handle_engine_events(self, events: list[protocol.Event]) -> None:
        if not self.is_attached:
            return  # the app is closing: its screens are being taken apart
        for event in events:
            if isinstance(event, protocol.RunStarted):
                if event.kind == self.KIND:
                    self._adopt(event)
            elif isinstance(event, protocol.Warning):
                self._warning(event)
            elif isinstance(event, protocol.Error):
                self._error(event)
            elif isinstance(event, protocol.Status):
                if event.stage == protocol.STARTING:
                    self._engine_restarted()
            elif self.run_id is not None and getattr(event, "run_id", None) == self.run_id:
                update = update_from_event(event)
                if update is not None:
                    self.view.apply(update)
                if isinstance(event, protocol.RunEnded):
                    self._ended(event)

    def _adopt(self, event: protocol.RunStarted) -> None:
        self.run_id, self.pending, self.stop_state = event.run_id, False, None
        self.sub_title = event.run_id
        self.view.show_run(self.app.store, event.run_id)
        self.view.apply(update_from_event(event))
        for run_id, message in self._early_warnings:
            if run_id == event.run_id:
                self._show_warning(message)
        self._early_warnings.clear()
        # Keys go to the screen (s stops it), not into a form field: a screen switched to for a resume is
        # auto-focused on its form after launch() cleared the focus.
        self.set_focus(None)
        self.on_run_started()
        self.refresh_bindings()

    def _warning(self, event: protocol.Warning) -> None:
        if event.run_id is None:
            return  # not about a run: the label screen's business
        if event.run_id == self.run_id:
            self._show_warning(event.message)
        elif self.pending:
            self._early_warnings.append((event.run_id, event.message))  # e.g. prompts cut, before RunStarted

    def _show_warning(self, message: str) -> None:
        self.view.add_warning(message)  # the status bar always shows the latest
        # A warning repeated every step (e.g. a negative KL) would bury the panes under toasts.
        now = time.monotonic()
        if now - self._last_warning_toast >= WARNING_TOAST_INTERVAL_S:
            self._last_warning_toast = now
            self.notify(message, title=f"{self.LABEL} warning", severity="warning", timeout=10)

    def _error(self, event: protocol.Error) -> None:
        if event.fatal:
            self._engine_died(event.message)
        elif event.is_about(self.REQUEST):
            self._request_failed(event.message)

    def _request_failed(self, message: str) -> None:
        if self.pending:
            self.pending = False
            self.view.show_nothing(None)
            self.show_start_error(message)
        elif self.run_id is not None:
            self.view.sync()  # the run marked itself failed before the error left the engine
        self._stop_done()
        self.notify(message, title=f"{self.LABEL} failed", severity="error", timeout=10)

    def _engine_died(self, message: str) -> None:
        if self.pending:
            self.pending = False
            self.view.show_nothing(None)
            self.show_start_error(f"the engine stopped before the run began: {message}")
        elif self.run_id is not None and not self.view.feed.final:
            self._settle_lost_run(message)
        self._stop_done()

    def _engine_restarted(self) -> None:
        """A fresh engine: anything still pending or running in the old one is gone."""
        if self.pending:
            self.pending = False
            self.view.show_nothing(None)
            self.show_start_error("the engine restarted before the run began: start it again")
        elif self.run_id is not None and not self.view.feed.final:
            self._settle_lost_run("the engine restarted")
        self._stop_done()

    def _settle_lost_run(self, reason: str) -> None:
        """The engine ended without a RunEnded: read how the run was left, marking it interrupted if it
        still says running (its process is gone), and say so."""
        store = self.app.store
        if not store.run(self.run_id).status.is_final:
            store.mark_interrupted_runs()
        self.view.sync()
        feed = self.view.feed
        saved = f"checkpoint at step {feed.checkpoint_step}" if feed.checkpoint_step else "no checkpoint"
        hint = "; resume it from Runs" if feed.checkpoint_step else ""
        message = f"{reason}: run {self.run_id} is {feed.status} at step {feed.step} ({saved}){hint}"
        self.view.apply(RunUpdate(message=message))
        self.notify(message, title=f"{self.LABEL} run lost", severity="error", timeout=15)

    def _ended(self, event: protocol.RunEnded) -> None:
        self.view.sync()  # the row has the end time, the checkpoint and any error
        self._stop_done()
        result = event.result
        severity = "error" if result.status == "failed" else "information"
        self.notify(f"{self.LABEL} run {result.run_id} {result.status}: {result.message}", severity=severity,
                    timeout=10)

    # -- stopping --------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if not self.run_active:
            self.notify(f"no {self.LABEL} run in progress", severity="warning")
            return
        if self.stop_state is None:
            if self.app.engine.send(protocol.StopRun(self.run_id)):
                self.stop_state, self.stop_requested_at = GRACEFUL, time.monotonic()
                self.view.set_notice("stopping… after this step (s again: at once)")
        elif self.stop_state == GRACEFUL:
            self._hard_stop("stop pressed again")

    def _check_stop_timeout(self) -> None:
        if self.stop_state == GRACEFUL and time.monotonic() - self.stop_requested_at > self.stop_timeout_s:
            self._hard_stop(f"no graceful stop within {self.stop_timeout_s:g} s")

    def _hard_stop(self, reason: str) -> None:
        if self.app.engine.send(protocol.StopRun(self.run_id, hard=True)):
            self.stop_state = HARD
            self.view.set_notice("stopping… at once")
            self.notify(f"hard stop ({reason}): the engine process ends the run at once; the steps after the "
                        "last checkpoint are lost", severity="warning", timeout=10)

    def _stop_done(self) -> None:
        self.stop_state = None
        self.view.set_notice(None)
        self.refresh_bindings()
