"""The Runs screen: every reward and PPO run in the workspace, opened as the same panes, resumed from here.

The table re-reads the database every RUNS_REFRESH_S, so runs started anywhere (the app, or
`rlhf-tui ppo` in another terminal) appear and move; runs whose process is gone are marked
interrupted as they are found. Enter (or o) opens a run: its panes are read from the database and keep
following it while it runs. `r` resumes a stopped, interrupted or failed run on the screen of its kind
(Reward model or Train), where it is watched and stopped like a new one.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header

from rlhf.run_rows import RESUMABLE_STATUSES, Run
from rlhf.store import Store

from ..widgets.agreement import AgreementPane
from ..widgets.run_feed import format_number
from ..widgets.run_view import SCROLL_SAMPLES_BINDINGS, RunView
from .base import RlhfScreen

RUNS_REFRESH_S = 2.0
DB_FOLLOW_INTERVAL_S = 0.5
# The final metrics shown per kind: (metric, label).
FINAL_METRICS = {"ppo": (("score_mean", "score"), ("kl_k1", "KL")), "reward": (("heldout_acc", "held-out acc"),)}
COLUMNS = ("run", "kind", "status", "steps", "final metrics")


def final_metrics_text(store: Store, run: Run) -> str:
    """The last logged value of the run's headline metrics, e.g. "score 0.531 · KL 0.12"."""
    parts = []
    for name, label in FINAL_METRICS[run.kind]:
        rows = store.metrics(run.id, name)
        if rows:
            parts.append(f"{label} {format_number(rows[-1]['value'])}")
    return " · ".join(parts)


def resume_refusal(run: Run) -> str | None:
    """Why this run cannot be resumed, or None when it can."""
    if not run.status.can_resume:
        return f"{run.id} is {run.status}: only stopped, interrupted or failed runs resume"
    return None


class RunsScreen(RlhfScreen):
    BINDINGS = [
        Binding("o", "open", "open (or enter)", id="open_run"),  # the table's own enter selects a row
        Binding("r", "resume", "resume", id="resume_run"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._shown: dict[str, tuple[str, int]] = {}  # run id -> (status, step) as last drawn

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = "rlhf-tui · runs"
        table = self.query_one(DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        self.refresh_runs()
        self.set_interval(RUNS_REFRESH_S, self.refresh_runs)

    def on_screen_resume(self) -> None:
        self.refresh_runs()

    def refresh_runs(self) -> None:
        """Redraw the rows whose status or step moved; new runs go on top."""
        store = self.app.store
        store.mark_interrupted_runs()
        runs = list(reversed(store.runs()))  # newest first
        table = self.query_one(DataTable)
        if [r.id for r in runs] != list(self._shown):
            selected = self.selected_run_id()
            table.clear()
            self._shown = {}
            for run in runs:
                table.add_row(*self._cells(store, run), key=run.id)
                self._shown[run.id] = (run.status, run.step)
            if selected in self._shown:
                table.move_cursor(row=table.get_row_index(selected))
            return
        for run in runs:
            if self._shown[run.id] != (run.status, run.step):
                for column, value in zip(COLUMNS, self._cells(store, run)):
                    table.update_cell(run.id, column, value)
                self._shown[run.id] = (run.status, run.step)

    @staticmethod
    def _cells(store: Store, run: Run) -> tuple[str, ...]:
        return (run.id, run.kind, run.status.value, f"{run.step}/{run.total_steps or '?'}",
                final_metrics_text(store, run))

    def selected_run_id(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        run_id = self.selected_run_id()
        if run_id is None:
            self.notify("no runs yet: train a reward model, then PPO", severity="warning")
            return
        self.app.push_screen(RunScreen(self.app.store.run(run_id)))

    async def action_resume(self) -> None:
        run_id = self.selected_run_id()
        if run_id is None:
            self.app.bell()
            return
        run = self.app.store.run(run_id)
        refusal = resume_refusal(run)
        if refusal:
            self.notify(refusal, severity="warning")
            return
        await self.app.resume_run(run)


class RunScreen(RlhfScreen):
    """One run's panes read from the database, following it while it runs (in any process)."""

    BINDINGS = [
        Binding("escape,q", "close", "back", id="close_run"),
        Binding("m", "more", "more metrics", id="more_metrics"),
        Binding("r", "resume", "resume", id="resume_run"),
        *SCROLL_SAMPLES_BINDINGS,
    ]

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run_row = run

    def compose(self) -> ComposeResult:
        yield Header()
        yield RunView(self.run_row.kind, id="panes")
        if self.run_row.kind == "ppo":  # is the reward model it trains against still the person's judge?
            yield AgreementPane(self.app.store, self.app.config.label.agreement_window, self.run_row.id,
                                id="agreement")
        yield Footer(compact=True)

    @property
    def view(self) -> RunView:
        return self.query_one("#panes", RunView)

    def on_mount(self) -> None:
        self.title = f"rlhf-tui · {self.run_row.kind} run {self.run_row.id}"
        self.view.show_run(self.app.store, self.run_row.id)
        self.set_interval(DB_FOLLOW_INTERVAL_S, self.view.sync)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("more", "scroll_samples"):
            return self.run_row.kind == "ppo"
        if action == "resume":
            return self.view.feed.status in RESUMABLE_STATUSES
        return True

    def action_close(self) -> None:
        self.dismiss()

    def action_more(self) -> None:
        self.view.toggle_secondary()

    def action_scroll_samples(self, lines: int) -> None:
        self.view.scroll_samples(lines)

    async def action_resume(self) -> None:
        run = self.app.store.run(self.run_row.id)
        refusal = resume_refusal(run)
        if refusal:
            self.notify(refusal, severity="warning")
            return
        self.dismiss()
        await self.app.resume_run(run)
