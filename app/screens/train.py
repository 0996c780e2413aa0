"""The Train screen: launch PPO (or RLOO / GRPO) in the engine process, watch it live, stop it live.

Setup: the reward run that scores the policy (default: the latest finished one) and the settings, the
algorithm among them (defaults from the config; each field checked as typed). Launching switches to the live
panes: reward (score and RLHF reward), KL (k1, k3, the coefficient β on the right axis, the controller's
target as a line), entropy, the newest sample generations, and a status bar (step/total, elapsed, ETA,
tokens/s, time per phase, last checkpoint, the latest warning). `m` swaps in the secondary metrics (the
value head's pane only for PPO), `f` goes back to the setup, `s` stops (twice: at once). Stopped and
interrupted runs are resumed from the Runs screen.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, ContentSwitcher, Footer, Header, Input, Label, Select, Static

from rlhf.config import Config
from rlhf.engine import protocol
from rlhf.store import Store

from ..widgets.agreement import AgreementPane
from ..widgets.run_feed import format_number
from ..widgets.run_view import SCROLL_SAMPLES_BINDINGS, RunView
from ..widgets.settings_form import FieldNavigation, SettingsForm
from .live_run import LiveRunScreen

PPO_FORM_KEYS = ("ppo.steps", "ppo.batch_size", "ppo.algorithm", "ppo.samples_per_prompt", "ppo.minibatches",
                 "ppo.ppo_epochs", "ppo.lr", "ppo.init_kl_coef", "ppo.kl_controller", "ppo.target_kl",
                 "ppo.max_new_tokens", "ppo.temperature", "ppo.checkpoint_every", "model.quantization")


def reward_run_choices(store: Store) -> list[tuple[str, str]]:
    """(label, run id) of every finished reward run, newest first (the first is what PPO uses by default),
    labelled with its held-out accuracy."""
    choices = []
    for run in store.finished_reward_runs():
        accuracy = store.metrics(run.id, "heldout_acc")
        choices.append((f"{run.id} · held-out acc {format_number(accuracy[-1]['value'] if accuracy else None)}",
                        run.id))
    return choices


class SetupPane(VerticalScroll, FieldNavigation):
    """The reward run choice, the settings and the Start button, walked through with up and down."""


class TrainScreen(LiveRunScreen):
    KIND = "ppo"
    REQUEST = protocol.StartPPO
    LABEL = "PPO"

    BINDINGS = [
        *LiveRunScreen.BINDINGS,
        Binding("f", "toggle_setup", "settings", id="toggle_setup"),
        Binding("escape", "show_panes", "back to the panes", show=False),  # works from a form field too
        Binding("m", "more", "more metrics", id="more_metrics"),
        *SCROLL_SAMPLES_BINDINGS,
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with ContentSwitcher(initial="setup", id="switcher"):
            with SetupPane(id="setup"):
                with Horizontal(id="reward-row"):
                    yield Label("reward run ")
                    yield Select([], prompt="no finished reward run: train one on the Reward model screen",
                                 compact=True, id="reward-run")
                yield SettingsForm(self.app.config, PPO_FORM_KEYS, id="form")
                with Horizontal(id="start-row"):
                    yield Button("Start PPO", id="start", variant="primary", compact=True)
                    yield Static("", id="form-error", markup=False)
            yield RunView("ppo", id="panes")
        yield AgreementPane(self.app.store, self.app.config.label.agreement_window, id="agreement")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = "rlhf-tui · train (PPO)"
        self.refresh_reward_runs()
        self.show_setup(True)

    def on_screen_resume(self) -> None:
        self.refresh_reward_runs()  # a reward run may have finished meanwhile

    @property
    def reward_select(self) -> Select:
        return self.query_one("#reward-run", Select)

    @property
    def showing_panes(self) -> bool:
        return self.query_one("#switcher", ContentSwitcher).current == "panes"

    def refresh_reward_runs(self) -> None:
        """Offer every finished reward run, keeping the choice made (default: the latest)."""
        choices = reward_run_choices(self.app.store)
        select, chosen = self.reward_select, self.reward_select.value
        select.set_options(choices)
        ids = [run_id for _, run_id in choices]
        if ids:
            select.value = chosen if chosen in ids else ids[0]

    def select_reward_run(self, run_id: str) -> None:
        self.refresh_reward_runs()
        self.reward_select.value = run_id
        self.show_setup(True)

    def show_setup(self, setup: bool) -> None:
        self.query_one("#switcher", ContentSwitcher).current = "setup" if setup else "panes"
        # The setup: typing goes to the first field (up/down move between fields, enter launches).
        # The panes: keys (s, m, arrows) go to the screen.
        self.set_focus(self.form.query_one(Input) if setup else None)
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "scroll_samples":
            return self.showing_panes
        return super().check_action(action, parameters)

    def show_start_error(self, message: str | None) -> None:
        self.query_one("#form-error", Static).update(message or "")
        if message:
            self.show_setup(True)

    def on_run_started(self) -> None:
        self.show_setup(False)
        self.query_one("#agreement", AgreementPane).follow(self.run_id)

    # -- actions ---------------------------------------------------------------------------------

    def action_start(self) -> bool:
        """Launch PPO with the form as it is (the chosen reward run and the settings shown), then show its panes."""
        launched = super().action_start()
        if launched:
            self.show_setup(False)
        return launched

    def start_request(self, config: Config) -> protocol.StartPPO:
        select = self.reward_select
        return protocol.StartPPO(config, reward_run=None if select.is_blank() else select.value)

    def action_toggle_setup(self) -> None:
        self.show_setup(self.showing_panes)

    def action_show_panes(self) -> None:
        self.show_setup(False)

    def action_more(self) -> None:
        self.show_setup(False)
        self.view.toggle_secondary()

    def action_scroll_samples(self, lines: int) -> None:
        self.view.scroll_samples(lines)
