"""A form of config settings, one field per `section.key`, checked as it is typed by rlhf.config's own rules.

Defaults come from the app's config (rlhf.toml plus flags); each field's doc is its tooltip. A value
the config would refuse shows the config's message (which names the key) under the field, and the
form has no values to launch with until every field is valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, Select, Static

from rlhf.config import SECTIONS, Config
from rlhf.errors import ConfigError

FORM_SOURCE = "form"  # the `source` of the config's messages, cut off when shown under a field


def setting_field(dotted: str) -> dataclasses.Field:
    """The config dataclass field behind `section.key`."""
    section, _, key = dotted.partition(".")
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}[key]


def setting_value(config: Config, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return getattr(getattr(config, section), key)


def parse_setting(dotted: str, text: str) -> Any:
    """A form entry as the type of its config field (int or float; text stays text)."""
    kind = type(setting_value(Config(), dotted))
    text = text.strip()
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{dotted} must be {kind.__name__}, got {text!r}") from None
    return text


def check_setting(config: Config, dotted: str, value: Any) -> str | None:
    """The config's own complaint about one value (naming the key), or None when it is accepted."""
    try:
        config.override({}).set(dotted, value, source=FORM_SOURCE)
    except ConfigError as exc:
        return str(exc).removeprefix(f"{FORM_SOURCE}: ")
    return None


def field_id(dotted: str) -> str:
    return "setting-" + dotted.replace(".", "-")


class FieldNavigation(Widget):
    """Up and down move between the fields inside (tab switches screens in this app), also past a Select,
    which would otherwise open on them; an open Select's list keeps its arrows."""

    BINDINGS = [
        Binding("down", "next_field", "next field", show=False, priority=True),
        Binding("up", "previous_field", "previous field", show=False, priority=True),
    ]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("next_field", "previous_field"):
            return not any(select.expanded for select in self.query(Select))
        return True

    def action_next_field(self) -> None:
        self.screen.focus_next()

    def action_previous_field(self) -> None:
        self.screen.focus_previous()


class SettingsForm(Grid, FieldNavigation):  # the widget base first: Textual inherits CSS from it
    """Fields for `keys` in a grid; `values()` gives `section.key` -> value and `chosen_config()` the config with
    them applied, or None while any field is wrong."""

    class Submitted(Message):
        """Enter was pressed in one of the fields."""

    def __init__(self, config: Config, keys: Sequence[str], *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id, classes="settings-form")
        self.config = config
        self.keys = tuple(keys)
        self._errors: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        for dotted in self.keys:
            with Vertical(classes="setting"):
                yield Label(dotted.partition(".")[2], classes="setting-label")
                yield self._field(dotted, setting_field(dotted), setting_value(self.config, dotted))
                yield Static("", classes="setting-error", markup=False)

    @staticmethod
    def _field(dotted: str, f: dataclasses.Field, value: Any) -> Widget:
        doc, choices = f.metadata["doc"], f.metadata.get("choices")
        if choices:
            return Select([(c, c) for c in choices], value=value, allow_blank=False, compact=True,
                          id=field_id(dotted), tooltip=doc)
        if isinstance(value, bool):
            return Checkbox("on", value, compact=True, id=field_id(dotted), tooltip=doc)
        return Input(str(value), compact=True, id=field_id(dotted), tooltip=doc)

    def _key_of(self, widget: Widget) -> str | None:
        return next((k for k in self.keys if field_id(k) == widget.id), None)

    def _raw(self, dotted: str) -> Any:
        widget = self.query_one(f"#{field_id(dotted)}")
        if isinstance(widget, Input):
            return parse_setting(dotted, widget.value)
        return widget.value

    def _check(self, dotted: str) -> None:
        try:
            error = check_setting(self.config, dotted, self._raw(dotted))
        except ConfigError as exc:
            error = str(exc)
        if error:
            self._errors[dotted] = error
        else:
            self._errors.pop(dotted, None)
        label = self.query_one(f"#{field_id(dotted)}").parent.query_one(".setting-error", Static)
        label.update(error or "")
        label.set_class(bool(error), "-shown")

    def on_input_changed(self, event: Input.Changed) -> None:
        dotted = self._key_of(event.input)
        if dotted:
            self._check(dotted)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Submitted())

    @property
    def errors(self) -> dict[str, str]:
        """`section.key` -> message, for every field the config refuses."""
        return dict(self._errors)

    def values(self) -> dict[str, Any] | None:
        for dotted in self.keys:
            self._check(dotted)
        if self._errors:
            return None
        return {dotted: self._raw(dotted) for dotted in self.keys}

    def chosen_config(self) -> Config | None:
        """The config the form started from with every field's value on top (what a run launched from it uses),
        or None while any field is wrong."""
        values = self.values()
        return None if values is None else self.config.override(values)
