"""A footer that shows whole keys only, in the screen's order of importance: those that do not fit its width are
left out, least important first."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from textual.widget import Widget
from textual.widgets import Footer, Label


class FittingFooter(Footer):
    """Textual's Footer, keys in the order of importance given by `order` (binding ids; keys not named follow in
    Footer's order), less the keys that would not fit on its line: Footer itself cuts the line at the edge,
    mid-key. Keys leave from the right end, those whose binding id is in `keep` only once no other key is left to
    go; a group of keys (Binding.Group) leaves with its label. Leaving a key out hides its label only: the binding
    stays active, and a help screen built from `screen.active_bindings` lists it.
    """

    def __init__(self, *, order: Sequence[str] = (), keep: Collection[str] = (), compact: bool = True,
                 show_command_palette: bool = True) -> None:
        super().__init__(compact=compact, show_command_palette=show_command_palette)
        self.order = {binding_id: rank for rank, binding_id in enumerate(order)}
        self.keep = frozenset(keep)

    async def recompose(self) -> None:
        """Footer recomposes whenever the screen's bindings change; the new keys are ordered and fitted in the same
        update."""
        async with self.batch():
            await super().recompose()
            units = sorted(self._units(), key=lambda unit: min((self.order.get(binding_id, len(self.order))
                                                                 for binding_id in self._binding_ids(unit)),
                                                                default=len(self.order)))
            position = {item: i for i, item in enumerate(item for unit in units for item in unit)}
            self.sort_children(key=position.__getitem__)
            self.fit_keys()

    def on_resize(self) -> None:
        self.fit_keys()

    def fit_keys(self) -> None:
        """Show as many keys as fit the footer's width, leaving out the least important ones."""
        room = self.size.width
        if not room:
            return  # not laid out yet: on_resize follows
        units = self._units()
        widths = [sum(self._width(item) for item in unit) for unit in units]
        kept = [not self.keep.isdisjoint(self._binding_ids(unit)) for unit in units]
        used = sum(widths)
        hidden = set()
        for i in sorted(range(len(units)), key=lambda i: (kept[i], -i)):  # the last first, kept keys after all
            if used <= room:
                break
            hidden.add(i)
            used -= widths[i]
        for i, unit in enumerate(units):
            for item in unit:
                item.display = i not in hidden

    def _units(self) -> list[list[Widget]]:
        """The footer's items as they show or leave together: a key, or a group of keys followed by its label."""
        units: list[list[Widget]] = []
        for item in self.children:
            if isinstance(item, Label) and units:
                units[-1].append(item)
            else:
                units.append([item])
        return units

    def _binding_ids(self, unit: list[Widget]) -> list[str]:
        """The ids of the bindings whose keys a unit shows."""
        active = self.screen.active_bindings
        keys = [key.key for item in unit for key in (item, *item.query("FooterKey")) if hasattr(key, "key")]
        return [active[key].binding.id for key in keys if key in active and active[key].binding.id]

    def _width(self, item: Widget) -> int:
        """Columns the item takes on the line, its margin included (measured even while it is hidden)."""
        return (item.get_content_width(self.size, self.app.size) + item.styles.gutter.width
                + item.styles.margin.width)
