"""RunView: the live panes of one run (charts, sample generations, progress and a status bar).

The same widget shows a run fed by engine events (Reward and Train screens) and a run read from the
database (the Runs list, also while another process is training): both arrive as `RunUpdate`s through
`apply`. Updates only touch buffers; a timer redraws the status and samples, and each chart redraws
on its own timer, so a fast stream of events never becomes a stream of UI messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.widgets import ProgressBar, Static

from rlhf.store import Store

from .charts import REDRAW_INTERVAL_S, MetricChart
from .run_feed import DbFollower, RunFeed, RunUpdate, detail_line, samples_text, status_line

CHANCE_ACCURACY = 0.5
SAMPLES_SCROLL_LINES = 3
# For the screens showing a RunView: the samples pane is not focusable, so its screen scrolls it.
SCROLL_SAMPLES_BINDINGS = [
    Binding("up", f"scroll_samples(-{SAMPLES_SCROLL_LINES})", "scroll samples up", show=False),
    Binding("down", f"scroll_samples({SAMPLES_SCROLL_LINES})", "scroll samples down", show=False),
    Binding("pageup", "scroll_samples(-30)", "page samples up", show=False),
    Binding("pagedown", "scroll_samples(30)", "page samples down", show=False),
]


@dataclass(frozen=True)
class ChartSpec:
    id: str
    title: str
    series: tuple[str, ...]
    right: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    target: float | None = None
    target_label: str = "target"

    def build(self) -> MetricChart:
        return MetricChart(self.title, self.series, right=self.right, labels=self.labels, target=self.target,
                           target_label=self.target_label, id=self.id)


PPO_PRIMARY = (
    ChartSpec("chart-reward", "reward", ("score_mean", "rlhf_reward"),
              labels={"score_mean": "score", "rlhf_reward": "rlhf"}),
    ChartSpec("chart-kl", "KL", ("kl_k1", "kl_k3"), right=("kl_coef",),
              labels={"kl_k1": "k1", "kl_k3": "k3", "kl_coef": "β"}),
    ChartSpec("chart-entropy", "entropy", ("entropy",)),
)
VALUE_CHART = "chart-value"  # hidden for the algorithms without a value head (RLOO, GRPO)
PPO_SECONDARY = (
    ChartSpec("chart-losses", "policy loss", ("policy_loss", "kl_loss"),
              labels={"policy_loss": "clipped", "kl_loss": "KL term"}),
    ChartSpec("chart-clipfrac", "policy clip fraction", ("policy_clipfrac",), labels={"policy_clipfrac": "latest"}),
    ChartSpec("chart-approx-kl", "approx KL", ("approx_kl",), labels={"approx_kl": "latest"}),
    ChartSpec("chart-length", "response length", ("response_length",), labels={"response_length": "tokens"}),
    ChartSpec("chart-eos", "EOS rate", ("eos_rate",), labels={"eos_rate": "latest"}),
    ChartSpec(VALUE_CHART, "value head", ("value_loss",), right=("explained_variance", "value_clipfrac"),
              labels={"value_loss": "loss", "explained_variance": "expl. var.", "value_clipfrac": "clip"}),
)
REWARD_CHARTS = (
    ChartSpec("chart-loss", "loss", ("loss", "heldout_loss"), labels={"loss": "train", "heldout_loss": "held-out"}),
    ChartSpec("chart-accuracy", "pairwise accuracy", ("train_acc", "heldout_acc"),
              labels={"train_acc": "train", "heldout_acc": "held-out"}, target=CHANCE_ACCURACY, target_label="chance"),
)


def kl_target(config: dict[str, Any]) -> float | None:
    """The KL the controller steers towards, or None when the coefficient is fixed."""
    ppo = config.get("ppo", {})
    # Runs stored before ppo.kl_controller have ppo.adaptive_kl instead.
    controller = ppo.get("kl_controller", "classic" if ppo.get("adaptive_kl") else "fixed")
    return ppo.get("target_kl") if controller != "fixed" else None


def has_value_head(config: dict[str, Any]) -> bool:
    """Whether the run trains a value head: PPO does, RLOO and GRPO do not (runs from before ppo.algorithm are PPO)."""
    return config.get("ppo", {}).get("algorithm", "ppo") == "ppo"


class SamplesPane(VerticalScroll, can_focus=False):
    """Sample generations, newest first, as plain text (model output is never read as markup)."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.border_title = "samples"
        self._body = Static("", markup=False)

    def compose(self) -> ComposeResult:
        yield self._body

    def show(self, text: str) -> None:
        self._body.update(text)

    @property
    def text(self) -> str:
        return str(self._body.content)


class RunView(Vertical):
    """Charts for a run of `kind` ("reward" or "ppo"), its samples (PPO), a progress bar and a status bar."""

    def __init__(self, kind: str, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id, classes="run-view")
        self.kind = kind
        self.feed = RunFeed(kind=kind)
        self.follower: DbFollower | None = None
        self.notice: str | None = None
        self._drawn: tuple[int, tuple[str, str]] | None = None  # (feed version, status rows) last drawn

    def compose(self) -> ComposeResult:
        if self.kind == "ppo":
            with Grid(id="primary", classes="run-grid"):
                for spec in PPO_PRIMARY:
                    yield spec.build()
                yield SamplesPane(id="samples")
            with Grid(id="secondary", classes="run-grid -six"):
                for spec in PPO_SECONDARY:
                    yield spec.build()
        else:
            with Grid(id="primary", classes="run-grid -two"):
                for spec in REWARD_CHARTS:
                    yield spec.build()
        # Two rows, cut with an ellipsis rather than wrapped: on 80x24 every row the charts lose counts.
        yield Static("", id="run-status", markup=False)
        with Horizontal(id="run-bar"):
            yield ProgressBar(show_eta=False, id="run-progress")
            yield Static("", id="run-detail", markup=False)

    def on_mount(self) -> None:
        if self.kind == "ppo":
            self.query_one("#secondary").display = False
        self.set_interval(REDRAW_INTERVAL_S, self.redraw)
        self.redraw()

    @property
    def charts(self) -> list[MetricChart]:
        return list(self.query(MetricChart))

    def chart(self, chart_id: str) -> MetricChart:
        return self.query_one(f"#{chart_id}", MetricChart)

    # -- data ------------------------------------------------------------------------------------

    def show_run(self, store: Store, run_id: str) -> None:
        """Show this run from scratch: everything the database has, then whatever `apply` or `sync` bring."""
        self._replace_feed(RunFeed(run_id, self.kind))
        self.follower = DbFollower(store, run_id)
        self.notice = None
        self.sync()

    def show_nothing(self, notice: str | None) -> None:
        """Empty panes, with `notice` in the status bar (e.g. while a run is being started)."""
        self._replace_feed(RunFeed(kind=self.kind))
        self.follower = None
        self.set_notice(notice)

    def _replace_feed(self, feed: RunFeed) -> None:
        self.feed, self._drawn = feed, None
        for chart in self.charts:
            chart.clear()

    def sync(self) -> None:
        """Bring in what the database gained since the last read."""
        if self.follower is not None:
            self.apply(self.follower.poll())

    def apply(self, update: RunUpdate) -> None:
        if update.reset:
            for chart in self.charts:
                chart.clear()
        self.feed.apply(update)
        for chart in self.charts:
            chart.add_steps(update.steps)
        if update.config is not None and self.kind == "ppo":
            self.chart("chart-kl").set_target(kl_target(update.config))
            self.chart(VALUE_CHART).display = has_value_head(update.config)

    def add_warning(self, message: str) -> None:
        self.feed.add_warning(message)

    def set_notice(self, notice: str | None) -> None:
        """Replaces the run's status in the status bar (e.g. "stopping…") until cleared with None."""
        self.notice = notice
        self.redraw()

    # -- views -----------------------------------------------------------------------------------

    @property
    def showing_secondary(self) -> bool:
        return self.kind == "ppo" and self.query_one("#secondary").display

    def toggle_secondary(self) -> None:
        secondary = not self.showing_secondary
        self.query_one("#secondary").display = secondary
        self.query_one("#primary").display = not secondary

    def scroll_samples(self, lines: int) -> None:
        if self.kind == "ppo":
            self.query_one(SamplesPane).scroll_relative(y=lines, animate=False)

    def status_rows(self) -> tuple[str, str]:
        return status_line(self.feed, notice=self.notice), detail_line(self.feed)

    def status_text(self) -> str:
        """Both status rows, uncut."""
        return "\n".join(self.status_rows())

    def redraw(self) -> None:
        """Status bar, progress and samples, when the run changed or the clock moved on."""
        rows = self.status_rows()
        if self._drawn == (self.feed.version, rows):
            return
        if self._drawn is None or self._drawn[0] != self.feed.version:
            progress = self.query_one("#run-progress", ProgressBar)
            progress.display = self.feed.run_id is not None  # an empty bar would pulse for nothing
            progress.update(total=self.feed.total_steps, progress=self.feed.step)
            if self.kind == "ppo":
                self.query_one(SamplesPane).show(samples_text(self.feed.samples))
        self.query_one("#run-status", Static).update(rows[0])
        self.query_one("#run-detail", Static).update(rows[1])
        self._drawn = (self.feed.version, rows)
