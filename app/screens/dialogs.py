"""Modal dialogs of the label screen: a note, and help with the labeling guidelines."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Markdown, TextArea

NO_GUIDELINES = ("_No guidelines yet._ Write them in a markdown file in the workspace "
                 "(`{name}`, set by `[label] guidelines` in rlhf.toml) and they appear here and at first start.")


class NoteModal(ModalScreen[str | None]):
    """Asks for a note; dismisses with the text (empty string clears), or None when cancelled.

    A multi-line field: a pasted note keeps every line. Enter keeps the note (priority: before the field
    would insert a line break); ctrl+j starts a new line by hand.
    """

    BINDINGS = [Binding("escape", "cancel", "cancel"),
                Binding("enter", "keep", "keep", priority=True),
                Binding("ctrl+j", "new_line", "new line", priority=True)]

    def __init__(self, current: str | None) -> None:
        super().__init__()
        self.current = current or ""

    def compose(self) -> ComposeResult:
        with Vertical(id="note-dialog", classes="dialog"):
            yield Label("Note for this pair (stored with your decision; enter to keep, ctrl+j new line, "
                        "escape to cancel)")
            yield TextArea(self.current, placeholder="e.g. both answers ignore the question", id="note-input",
                           soft_wrap=True, show_line_numbers=False)

    def on_mount(self) -> None:
        self.query_one(TextArea).move_cursor(self.query_one(TextArea).document.end)

    def action_keep(self) -> None:
        self.dismiss(self.query_one(TextArea).text.strip())

    def action_new_line(self) -> None:
        self.query_one(TextArea).insert("\n")

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """The workspace's labeling guidelines (markdown) above the key list."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "close")]

    def __init__(self, guidelines: str, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.guidelines = guidelines
        self.keys = keys

    def compose(self) -> ComposeResult:
        key_list = "\n".join(f"- **{keys}**  {action}" for keys, action in self.keys)
        with VerticalScroll(id="help-dialog", classes="dialog"):
            yield Markdown(f"{self.guidelines}\n\n## Keys\n\n{key_list}\n\n_escape closes this help._")

    def action_close(self) -> None:
        self.dismiss(None)
