"""The Reward model screen: train the LoRA Bradley-Terry reward model in the engine and watch it learn.

A one-row form (epochs, learning rate, batch size, quantization; the rest comes from rlhf.toml) starts
training; loss and pairwise-accuracy charts (train per step, held-out per epoch, chance as a line), a
progress bar and a status line follow it; `s` stops it (the adapter so far is saved, and the run can be
resumed from the Runs screen). A finished run is what PPO uses: `p` takes it to the Train screen. The
screen opens on the latest finished run.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Footer, Header, Static

from rlhf.engine import protocol

from ..widgets.run_view import RunView
from ..widgets.settings_form import SettingsForm
from .live_run import LiveRunScreen

REWARD_FORM_KEYS = ("reward.epochs", "reward.lr", "reward.batch_size", "reward.quantization")


class RewardScreen(LiveRunScreen):
    KIND = "reward"
    REQUEST = protocol.StartReward
    LABEL = "reward model"

    BINDINGS = [
        *LiveRunScreen.BINDINGS,
        Binding("p", "use_for_ppo", "use for PPO", id="use_for_ppo"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="launch"):
            yield SettingsForm(self.app.config, REWARD_FORM_KEYS, id="form")
            yield Button("Train", id="start", variant="primary", compact=True)
        yield Static("", id="form-error", markup=False)
        yield RunView("reward", id="panes")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = "rlhf-tui · reward model"
        self.show_start_error(None)
        latest = self.app.store.latest_run("reward")
        if latest is not None:
            self.view.show_run(self.app.store, latest.id)
            self.sub_title = latest.id

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "use_for_ppo":
            return self.view.feed.status == "finished"
        return super().check_action(action, parameters)

    def show_start_error(self, message: str | None) -> None:
        error = self.query_one("#form-error", Static)
        error.update(message or "")
        error.display = bool(message)

    # -- actions ---------------------------------------------------------------------------------

    async def action_use_for_ppo(self) -> None:
        feed = self.view.feed
        if feed.status != "finished":
            self.notify("only a finished reward run can score PPO", severity="warning")
            return
        await self.app.action_use_reward_run(feed.run_id)
