"""The Textual app: screens as modes (`tab` cycles them), one engine process, events drained on a timer.

`run_app` is what `rlhf-tui` (no subcommand) calls. The app never imports torch: sampling and
training run in the engine process, reached through `rlhf.engine.client`.
"""

from __future__ import annotations

import asyncio
import getpass
import signal
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from textual import events
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen

from rlhf.config import Config, Workspace
from rlhf.demo_mode import DEMO_NOTICE, is_demo
from rlhf.engine import protocol
from rlhf.engine.client import EngineClient
from rlhf.errors import RlhfError
from rlhf.store import Store

from .screens import TABS
from .screens.live_run import RUN_MODES, LiveRunScreen
from .screens.train import TrainScreen

# A closed terminal or dropped SSH session (SIGHUP) and a polite kill (SIGTERM) quit like Ctrl+Q: a run in
# progress stops after its step with a checkpoint before the app exits.
# (Windows has no SIGHUP.)
QUIT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
ENGINE_POLL_INTERVAL_S = 0.05  # drains every waiting event at once: one redraw per batch, not per event
NARROW_WIDTH = 100  # below this many columns the answers stack
SHORT_HEIGHT = 30  # below this many rows the Train screen keeps every row for its charts
DATABASE_CHECK_INTERVAL_S = 2.0  # how soon a deleted rlhf.db is noticed (it is also checked before each write)

EngineListener = Callable[[list[protocol.Event]], None]
ScreenT = TypeVar("ScreenT", bound=Screen)


def default_annotator() -> str:
    """The OS user name, or "anonymous" where there is none (e.g. a container without a passwd entry)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "anonymous"


def keymap_problems(keymap: dict[str, Any], known_ids: set[str]) -> list[str]:
    """What is wrong with a `[label] keymap` (binding id -> comma-separated keys), one line per problem."""
    problems = [f"unknown binding id {binding_id!r}" for binding_id in keymap if binding_id not in known_ids]
    problems += [f"{binding_id!r} must map to keys in a string, e.g. \"j,down\"" for binding_id, keys in keymap.items()
                 if not isinstance(keys, str)]
    return problems


def read_guidelines(root: Path, name: str) -> tuple[str | None, str | None]:
    """The workspace's labeling guidelines file `name` (`[label] guidelines`): (text, None); (None, None) when
    there is no such file; (None, one line saying why) when it cannot be shown. Only a regular file inside the
    workspace is read, symlinks resolved: the setting must not display /etc/shadow, nor block on a FIFO."""
    workspace = root.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(workspace):
        return None, (f"[label] guidelines = {name!r} is outside the workspace: only a file inside {workspace} "
                      "is shown")
    if not path.exists():
        return None, None
    if not path.is_file():
        return None, f"[label] guidelines = {name!r} is not a regular file (a directory?): name a markdown file"
    try:
        return path.read_text(encoding="utf-8"), None
    except UnicodeDecodeError as exc:
        return None, (f"[label] guidelines = {name!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                      f"offset {exc.start}): save it as UTF-8")
    except OSError as exc:
        return None, f"[label] guidelines = {name!r} cannot be read: {exc.strerror or exc}"


class RlhfApp(App):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere find it too
    TITLE = "rlhf-tui"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (NARROW_WIDTH, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (SHORT_HEIGHT, "-tall")]
    MODES = {tab.name: tab.screen for tab in TABS}
    DEFAULT_MODE = TABS[0].name
    BINDINGS = [
        Binding("tab", "next_screen(1)", "screens", id="next_screen", priority=True),
        Binding("shift+tab", "next_screen(-1)", "previous screen", id="previous_screen", priority=True, show=False),
        Binding("ctrl+r", "restart_engine", "restart", id="restart_engine", priority=True,
                tooltip="restart the engine"),  # short: every Label key fits a 120-column footer
        Binding("ctrl+t", "switch_mode('stats')", "stats", id="stats_screen", show=False),  # also in the palette
        Binding("ctrl+e", "switch_mode('eval')", "eval", id="eval_screen", show=False),  # also in the palette
    ]

    def __init__(self, workspace: Workspace, config: Config, annotator: str | None = None) -> None:
        super().__init__()
        self.workspace = workspace
        self.config = config
        self.annotator = annotator or config.label.annotator or default_annotator()
        self.store = Store(workspace.db_path)  # opened here: a bad workspace fails before the screen takes over
        self.store.mark_interrupted_runs()  # runs killed with an earlier app (or headless) say so from the start
        self.engine = EngineClient(workspace, config)  # the engine samples and trains with this very config
        self._engine_listeners: list[EngineListener] = []
        self.database_lost: str | None = None  # why the database could not be written back, once it could not
        self.last_key_at = 0.0  # when the latest key was pressed (its event's time): decisions are timed by it

    def on_mount(self) -> None:
        keymap = self.config.label.keymap
        known_ids = {b.id for cls in (type(self), *(tab.screen for tab in TABS)) for b in cls.BINDINGS if b.id}
        problems = keymap_problems(keymap, known_ids)
        if problems:
            self.notify(f"[label] keymap in rlhf.toml ignored: {'; '.join(problems)} "
                        f"(binding ids: {', '.join(sorted(known_ids))})", severity="warning", timeout=15)
        else:
            self.set_keymap(keymap)
        loop = asyncio.get_running_loop()
        for signum in QUIT_SIGNALS:
            try:
                loop.add_signal_handler(signum, self._quit_on_signal, signum)
            except NotImplementedError:  # Windows' event loops: the signal keeps its default action
                break
        self.engine.start()
        self.call_after_refresh(self.refresh_bindings)  # the footer was drawn before the start: restart showed
        self.set_interval(ENGINE_POLL_INTERVAL_S, self._drain_engine)
        self.set_interval(DATABASE_CHECK_INTERVAL_S, self.ensure_database_on_disk)

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key):
            self.last_key_at = event.time
        await super().on_event(event)

    def _quit_on_signal(self, signum: int) -> None:
        self.exit(return_code=128 + signum)  # the shell's way: 143 for SIGTERM, 129 for SIGHUP

    def on_unmount(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in QUIT_SIGNALS:
            try:
                loop.remove_signal_handler(signum)
            except NotImplementedError:
                break
        self.engine.stop()  # a run in progress stops after its step with a checkpoint first
        self.store.close()

    def format_title(self, title: str, sub_title: str) -> Content:
        # On the demo model every screen's header says so, after the screen's own subtitle.
        if is_demo(self.config):
            sub_title = f"{sub_title} · {DEMO_NOTICE}" if sub_title else DEMO_NOTICE
        return super().format_title(title, sub_title)

    # -- database --------------------------------------------------------------------------------

    def ensure_database_on_disk(self) -> bool:
        """Notice an rlhf.db deleted while the app runs and write it back whole, before anything is lost (our
        connection still holds the deleted file open); False when that failed and labels cannot be kept.

        Writing it back beats refusing to label: every label, not only this session's, would otherwise go
        when the app exits. The engine restarts to write its answers into the restored file too.
        """
        if self.database_lost is not None:
            self.notify(self.database_lost, severity="error", timeout=10)
            return False
        if self.store.still_on_disk():
            return True
        try:
            path = self.store.restore_to_disk()
        except RlhfError as exc:
            self.database_lost = f"{exc}; labeling stops: quit and restart the app"
            self.notify(self.database_lost, severity="error", timeout=30)
            return False
        restart = "the engine restarts to use it" if not self.engine.running_runs else (
            "the run in progress still writes to the deleted file: press ctrl+r once it ends")
        self.notify(f"{path.name} was deleted while the app ran: wrote it back with every label "
                    f"({self.store.stats()['comparisons']} comparisons); {restart}", severity="warning", timeout=20)
        if not self.engine.running_runs:
            self.engine.restart()
        return True

    # -- engine ----------------------------------------------------------------------------------

    def subscribe_engine(self, listener: EngineListener) -> None:
        """Call `listener` with every batch of engine events from now on."""
        self._engine_listeners.append(listener)

    def _drain_engine(self) -> None:
        if not self.is_running:
            return  # shutting down: screens are being taken apart, and nobody is left to show events to
        events = self.engine.poll()
        if not events:
            return
        for listener in list(self._engine_listeners):
            listener(events)
        if any(isinstance(e, protocol.Error) and e.fatal or isinstance(e, protocol.Responding) for e in events):
            self.refresh_bindings()  # shows (or hides) the restart key

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # False hides a key (and turns it off) while it has nothing to do: the Footer has no room to spare.
        if action == "restart_engine":
            return not self.engine.alive or self.engine.unresponsive
        if action == "next_screen":
            return len(TABS) > 1
        return True

    def action_restart_engine(self) -> None:
        """Start a fresh engine; its first Status (stage "starting") tells the screens to forget old requests."""
        self.engine.restart()
        self.refresh_bindings()

    # -- screens ---------------------------------------------------------------------------------

    def action_next_screen(self, step: int) -> None:
        names = [tab.name for tab in TABS]
        self.switch_mode(names[(names.index(self.current_mode) + step) % len(names)])

    async def show_screen(self, mode: str, screen_type: type[ScreenT]) -> ScreenT:
        """Switch to `mode` (mounting its screen the first time) and return that screen, a `screen_type` (MODES
        says which)."""
        await self.switch_mode(mode)
        return cast(ScreenT, self.screen)

    async def action_start_ppo(self) -> None:
        """The command palette's "Start PPO": the Train screen's form as it is (by default the latest finished
        reward run and the config's settings)."""
        train = await self.show_screen("train", TrainScreen)
        train.action_start()

    async def action_stop_run(self) -> None:
        """The command palette's "Stop run": the Stop key of the screen watching the engine's run."""
        running = sorted(self.engine.running_runs)
        if not running:
            self.notify("no run in progress", severity="warning")
            return
        screen = await self.show_screen(RUN_MODES[self.store.run(running[0]).kind], LiveRunScreen)
        screen.action_stop()

    async def resume_run(self, run: dict[str, Any]) -> None:
        """Resume a run on the screen of its kind, where it is then watched and stopped like any other."""
        screen = await self.show_screen(RUN_MODES[run.kind], LiveRunScreen)
        screen.resume(run.id)

    async def action_use_reward_run(self, run_id: str) -> None:
        """Take a finished reward run to the Train screen, chosen there to score PPO."""
        train = await self.show_screen("train", TrainScreen)
        train.select_reward_run(run_id)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for tab in TABS:
            yield SystemCommand(tab.title, f"Switch to the {tab.title} screen", partial(self.switch_mode, tab.name))
        yield SystemCommand("Start PPO", "Launch PPO with the Train screen's settings (default: the latest "
                            "finished reward run and the config)", self.action_start_ppo)
        yield SystemCommand("Stop run", "Stop the run in progress after its step (again while stopping: at once)",
                            self.action_stop_run)
        yield SystemCommand("Restart engine", "Stop the engine process and start a fresh one",
                            self.action_restart_engine)

    def guidelines(self) -> tuple[str | None, str | None]:
        """The workspace's labeling guidelines (markdown) and why they cannot be shown, as `read_guidelines`."""
        return read_guidelines(self.workspace.root, self.config.label.guidelines)


def run_app(workspace: Workspace, config: Config, annotator: str | None = None) -> int:
    """Run the app in this terminal until the person quits; the engine process is stopped on the way out."""
    app = RlhfApp(workspace, config, annotator=annotator)
    try:
        app.run()
    finally:
        app.engine.stop()
    return app.return_code or 0
