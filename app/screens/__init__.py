"""The app's top-level screens, in `tab` order. Each is a Textual mode; adding a screen is one entry.

Each subclasses `base.RlhfScreen`, whose `self.app` is typed as the `RlhfApp`. A screen that wants engine
events subscribes in its `on_mount` with `self.app.subscribe_engine(callback)`; the callback receives each
batch of events as a list.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.screen import Screen

from .eval import EvalScreen
from .label import LabelScreen
from .reward import RewardScreen
from .runs import RunsScreen
from .stats import StatsScreen
from .train import TrainScreen


@dataclass(frozen=True)
class Tab:
    name: str  # the Textual mode name
    title: str
    screen: type[Screen]


TABS: tuple[Tab, ...] = (
    Tab("label", "Label", LabelScreen),
    Tab("reward", "Reward model", RewardScreen),
    Tab("train", "Train", TrainScreen),
    Tab("runs", "Runs", RunsScreen),
    Tab("stats", "Stats", StatsScreen),
    Tab("eval", "Eval", EvalScreen),
)
