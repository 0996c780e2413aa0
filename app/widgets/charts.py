"""MetricChart: a line chart of named metrics by step (textual-plotext), fed from a buffer, redrawn on a timer.

Adding points only touches the buffer; a timer redraws at most every REDRAW_INTERVAL_S, and only when
something changed. However fast steps arrive, the chart costs one plot per interval: posting a redraw
per event floods Textual's message queue and freezes input (see the field notes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from textual_plotext import PlotextPlot

REDRAW_INTERVAL_S = 0.25
# Plotext and Textual markup both know these names: a series and its name in the title share a colour.
SERIES_COLORS = ("cyan", "magenta", "yellow", "green", "blue", "red")
TARGET_COLOR = "red"


class MetricChart(PlotextPlot):
    """Series by step on a left axis (and optionally a right one), an optional horizontal target line,
    and the title on the border with each series' latest value."""

    DEFAULT_CSS = """
    MetricChart {
        border: round $primary-darken-2;
        border-title-color: $text;
        padding: 0;
    }
    """

    def __init__(self, title: str, series: Sequence[str], *, right: Sequence[str] = (),
                 labels: Mapping[str, str] | None = None, target: float | None = None, target_label: str = "target",
                 id: str | None = None, classes: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id, classes=classes)
        self.chart_title = title
        self.left, self.right = tuple(series), tuple(right)
        self.labels = dict(labels or {})
        self.target, self.target_label = target, target_label
        self.points: dict[str, dict[int, float]] = {name: {} for name in (*self.left, *self.right)}
        self.redraws = 0
        self._dirty = True

    def on_mount(self) -> None:
        self.set_interval(REDRAW_INTERVAL_S, self.redraw)
        self.redraw()

    # -- the buffer ----------------------------------------------------------------------------------

    def add_steps(self, steps: Mapping[int, Mapping[str, float]]) -> None:
        """Record the values of this chart's series at each step (others are ignored; a step sent twice overwrites)."""
        for step, values in steps.items():
            for name, points in self.points.items():
                value = values.get(name)
                if value is not None and math.isfinite(value):
                    points[step] = value
                    self._dirty = True

    def clear(self) -> None:
        for points in self.points.values():
            points.clear()
        self._dirty = True

    def set_target(self, value: float | None, label: str | None = None) -> None:
        self.target = value
        self.target_label = label or self.target_label
        self._dirty = True

    def latest(self, name: str) -> float | None:
        points = self.points[name]
        return points[max(points)] if points else None

    # -- drawing -------------------------------------------------------------------------------------

    def title_markup(self) -> str:
        """`title · name value · …`, each name in its series' colour."""
        parts = [self.chart_title]
        for name, color in zip((*self.left, *self.right), SERIES_COLORS):
            value = self.latest(name)
            shown = "–" if value is None else f"{value:.3g}"
            parts.append(f"[{color}]{self.labels.get(name, name)}[/] {shown}")
        if self.target is not None:
            parts.append(f"[{TARGET_COLOR}]{self.target_label}[/] {self.target:g}")
        return " · ".join(parts)

    def redraw(self) -> None:
        """Plot the buffer again if it changed since the last redraw."""
        if not self._dirty:
            return
        self._dirty = False
        self.redraws += 1
        plt = self.plt
        plt.clear_data()
        for name, color in zip((*self.left, *self.right), SERIES_COLORS):
            points = self.points[name]
            if points:
                steps = sorted(points)
                plt.plot(steps, [points[s] for s in steps], color=color,
                         yside="right" if name in self.right else "left")
        if self.target is not None and any(self.points.values()):
            plt.hline(self.target, TARGET_COLOR)
        self.border_title = self.title_markup()
        self.refresh()
