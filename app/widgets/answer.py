"""An answer (or prompt) shown as plain, scrollable text: model output is never read as markup."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static

_CONTROL_PICTURES = {code: chr(0x2400 + code) for code in range(0x20) if chr(code) not in "\n\t"}
_CONTROL_PICTURES[0x7F] = "\u2421"


def visible_text(text: str) -> str:
    """Control characters as their Unicode pictures (␛, ␀…): raw escapes would drive the terminal."""
    return text.translate(_CONTROL_PICTURES)


class _PaneText(Static):
    """The text of a pane; says when layout gives it a new size."""

    def on_resize(self) -> None:
        self.post_message(TextPane.Resized())


class TextPane(VerticalScroll, can_focus=False):
    """A bordered, scrollable block of plain text; the title and subtitle sit on its border.

    Not focusable: the label screen scrolls both answers together with its own keys.
    """

    class Resized(Message):
        """Layout gave the pane or its text a new size. Sizes are only known once laid out, and Textual may run
        after-refresh callbacks before a newly shown widget is laid out: this says when measuring is safe."""

    def __init__(self, title: str, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self.border_title = title
        self._body = _PaneText("", markup=False, classes="pane-body")

    def on_resize(self) -> None:
        self.post_message(self.Resized())

    def compose(self) -> ComposeResult:
        yield self._body

    def text_height(self) -> int:
        """Rows this pane needs to show its whole text at its current width, border included (as last laid out:
        the border alone before its first layout)."""
        return self._body.outer_size.height + self.styles.gutter.height

    def show(self, text: str, subtitle: str = "") -> None:
        self._body.update(visible_text(text))
        self.border_subtitle = subtitle
        self.scroll_home(animate=False)
