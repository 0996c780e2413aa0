"""The reward model against the person, on the Train screen: how often it agreed with the newest labels on
pairs it scored as they were served (a 95% Wilson interval), the alarm when that falls (the reward-hacking
signal: `rlhf.agreement.agreement_falls`), and the length-vs-score correlation of the samples of the PPO run on
screen (`ppo_run`; the latest PPO run while none is).

It reads the store itself every `REFRESH_S` seconds (three small queries), so it follows labels made on the
Label screen, during a run or in another session on the same workspace.
"""

from __future__ import annotations

from typing import Any

from textual.widgets import Static

from rlhf.agreement import reward_model_check
from rlhf.store import Store

REFRESH_S = 2.0


def agreement_lines(check: dict[str, Any]) -> list[str]:
    """What the pane shows for a `reward_model_check`: one line of figures, and the alarm on a line of its own."""
    if check["n"]:
        low, high = check["wilson_95"]
        heldout = check["heldout_accuracy"]
        figures = [f"reward model vs you: agrees on {check['agree']}/{check['n']} newest labels "
                   f"({check['share']:.0%}, 95% {low:.0%}-{high:.0%})"
                   + (f", held-out {heldout:.0%}" if heldout is not None else "")]
    else:
        figures = ["reward model vs you: no labels it judged yet (pairs served after a reward run are)"]
    length = check["length_score"]
    if length["pearson"] is not None:
        figures.append(f"length~score r {length['pearson']:+.2f} ({length['samples']} samples)")
    lines = [" · ".join(figures)]
    if check["warning"]:
        lines.append(f"⚠ {check['warning']}: the policy may be exploiting it; label more, then refit")
    return lines


class AgreementPane(Static):
    """Two lines under the Train screen's panes; the class `falling` while the alarm is on."""

    DEFAULT_CSS = """
    AgreementPane { height: auto; padding: 0 1; color: $text-muted; }
    AgreementPane.falling { color: $warning; text-style: bold; }
    """

    def __init__(self, store: Store, window: int, ppo_run: str | None = None, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.store, self.window = store, window
        self.ppo_run = ppo_run  # whose samples the length correlation reads; None: the latest PPO run

    def on_mount(self) -> None:
        self.refresh_check()
        self.set_interval(REFRESH_S, self.refresh_check)

    def follow(self, ppo_run: str) -> None:
        """Measure the length correlation on this PPO run's samples from now on."""
        self.ppo_run = ppo_run
        self.refresh_check()

    def refresh_check(self) -> None:
        check = reward_model_check(self.store, self.window, self.ppo_run)
        self.update("\n".join(agreement_lines(check)))
        self.set_class(check["warning"] is not None, "falling")
