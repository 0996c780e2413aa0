"""The base of the app's screens: `self.app` typed as the RlhfApp (Textual types it as any App), so a screen's
use of the app's store, engine and config is checked like the rest of the code."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen, ScreenResultType

if TYPE_CHECKING:
    from ..main import RlhfApp  # main imports the screens: only the type checker follows this one


class RlhfScreen(Screen[ScreenResultType]):
    @property
    def app(self) -> RlhfApp:
        return cast("RlhfApp", super().app)
