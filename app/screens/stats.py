"""The Stats screen: annotator quality and the reward model against the labels, the figures `rlhf-tui stats`
prints (`rlhf.agreement.workspace_report`), read from the workspace's store in the app process: no engine.

The report is shown generically: each list of records (per annotator, per annotator pair) is a table whose
columns are the records' keys, nested figures flattened ("self consistency share"), and every other figure is
a line. A figure added to the report appears here without a change. Re-read each time the screen is shown,
and with `r`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static

from rlhf.agreement import workspace_report

from .base import RlhfScreen

COUNTS = ("prompts", "responses", "comparisons", "by_choice", "runs")  # the summary line's figures
# Titles for the sections the report has today; any other section is titled by its key.
SECTION_TITLES = {
    "annotators": "Per annotator: side-A share of a/b picks with its 95% Wilson interval (position bias: a fair "
                  "annotator's interval holds 0.5), decision time, self-consistency on repeated pairs",
    "agreement": "Agreement between annotators on the pairs both labeled (Cohen's kappa)",
    "krippendorff_alpha": "Agreement among all annotators (Krippendorff's alpha, nominal)",
    "reward_model": "Reward model vs your labels, on pairs it scored as they were served",
}
NO_LABELS = "No labeled decisions yet: label pairs on the Label screen (tab), then come back."
# What an empty list of records means, per section; any other says "none yet".
EMPTY = {"agreement": "none yet: it needs two annotators who labeled the same pairs (each with --annotator NAME)"}


def is_share(value: Any) -> bool:
    """A share with its 95% Wilson interval (`rlhf.agreement.share_with_interval`, or a merged "x" + "x_wilson_95")."""
    return isinstance(value, Mapping) and {"share", "wilson_95"} <= value.keys()


def format_value(value: Any) -> str:
    """One figure as text: None as "–", floats to 2 decimals, an interval as "low–high", a share as
    "k/n 0.60 (0.23–0.88)" (its 95% interval; "–" when n = 0), a list of names joined with " · "."""
    if value is None:
        return "–"
    if is_share(value):
        if value.get("n") == 0:
            return "–"
        counts = f"{value['agree']}/{value['n']} " if "n" in value else ""
        return f"{counts}{format_value(value['share'])} ({format_value(value['wilson_95'])})"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(isinstance(v, float) for v in value):
            return f"{value[0]:.2f}–{value[1]:.2f}"
        return " · ".join(format_value(v) for v in value)
    return str(value)


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A record as named figures: nested records spread out with their keys joined by a space ({"a": {"n": 1}}
    -> {"a n": 1}), underscores read as spaces; a share stays one figure with its interval, which joins it
    ({"x": 0.7, "x_wilson_95": [...]} -> {"x": {"share": 0.7, "wilson_95": [...]}}); share_with_interval's fields
    inside a larger record become its figure "agree"."""
    record = dict(record)
    if {"share", "wilson_95"} <= record.keys():  # share_with_interval's fields inside a larger record
        record = {"agree": {k: record.pop(k) for k in ("agree", "n", "share", "wilson_95") if k in record},
                  **record}
    for key in [k for k in record if f"{k}_wilson_95" in record]:
        record[key] = {"share": record[key], "wilson_95": record.pop(f"{key}_wilson_95")}
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key.replace('_', ' ')}"
        if isinstance(value, Mapping) and not is_share(value):
            flat.update(flatten(value, f"{name} "))
        else:
            flat[name] = value
    return flat


def columns_of(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The flattened keys of every record, in first-seen order (a key some records lack is still a column)."""
    return list(dict.fromkeys(key for record in records for key in flatten(record)))


def describe(figures: Mapping[str, Any]) -> str:
    """A record as one line, "name value · name value", figures that are None left out."""
    return " · ".join(f"{name} {format_value(value)}" for name, value in flatten(figures).items() if value is not None)


def position_bias_note(annotators: Iterable[Mapping[str, Any]]) -> str | None:
    """Which annotators pick side A more or less often than chance: their share's 95% Wilson interval leaves
    out 0.5 (sides are randomized, so a fair annotator's includes it); None when nobody's does."""
    biased = [f"{a['annotator']} ({format_value(a['a_share'])}, 95% {format_value(a['a_share_wilson_95'])})"
              for a in annotators if a["a_picks"] + a["b_picks"] and not
              a["a_share_wilson_95"][0] <= 0.5 <= a["a_share_wilson_95"][1]]
    return f"position bias: {', '.join(biased)}" if biased else None


def counts_line(report: Mapping[str, Any]) -> str:
    choices = ", ".join(f"{choice} {n}" for choice, n in report["by_choice"].items())
    runs = ", ".join(f"{kind_status} {n}" for kind_status, n in report["runs"].items()) or "none"
    return (f"prompts {report['prompts']} · responses {report['responses']} · comparisons {report['comparisons']} "
            f"({choices}) · runs: {runs}")


class StatsScreen(RlhfScreen):
    DEFAULT_CSS = """
    #stats-body { padding: 0 1; }
    #stats-body DataTable { height: auto; max-height: 16; }
    .stats-title { margin-top: 1; text-style: bold; }
    .stats-warning { color: $text-warning; }
    """
    BINDINGS = [Binding("r", "refresh", "refresh", id="refresh_stats")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="stats-body")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = "rlhf-tui · stats"

    async def on_screen_resume(self) -> None:
        await self.action_refresh()

    async def action_refresh(self) -> None:
        """Read the report again and rebuild the sections from it."""
        report = workspace_report(self.app.store, self.app.config.label.agreement_window)
        body = self.query_one("#stats-body", VerticalScroll)
        await body.remove_children()
        await body.mount_all(self._sections(report))

    def _sections(self, report: Mapping[str, Any]) -> Iterable[Static | DataTable]:
        yield Static(counts_line(report), classes="stats-counts", markup=False)
        if "annotators" not in report:
            yield Static(NO_LABELS, classes="stats-line", markup=False)
        known_first = sorted(report, key=lambda k: list(SECTION_TITLES).index(k) if k in SECTION_TITLES else 99)
        for key in known_first:
            value = report[key]
            if key in COUNTS:
                continue
            yield Static(SECTION_TITLES.get(key, key.replace("_", " ")), classes="stats-title", markup=False)
            if isinstance(value, list) and not value:
                yield Static(EMPTY.get(key, "none yet"), classes="stats-line", markup=False)
            elif isinstance(value, list):
                yield self._table(key, value)
            elif isinstance(value, Mapping):
                yield Static(describe({k: v for k, v in value.items() if k != "warning"}), classes="stats-line",
                             markup=False)
                if value.get("warning"):
                    yield Static(f"warning: {value['warning']}", classes="stats-warning", markup=False)
            else:
                yield Static(format_value(value), classes="stats-line", markup=False)
            if key == "annotators" and (note := position_bias_note(value)):
                yield Static(note, classes="stats-warning", markup=False)

    @staticmethod
    def _table(key: str, records: list[Mapping[str, Any]]) -> DataTable:
        table: DataTable = DataTable(id=f"stats-{key}", cursor_type="none", zebra_stripes=True)
        columns = columns_of(records)
        table.add_columns(*columns)
        for record in records:
            flat = flatten(record)
            # Text: names are the user's own (--annotator), never read as markup
            table.add_row(*(Text(format_value(flat.get(column))) for column in columns))
        return table
