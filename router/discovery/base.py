"""Discovery: which pods exist. Health and load are the monitor's business, not discovery's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

OnChange = Callable[[frozenset[str]], None]


class Discovery(Protocol):
    """A source of pod base URLs."""

    async def run(self, on_change: OnChange) -> None:
        """Call `on_change` with the whole set of pod URLs now and whenever it changes.

        Runs until cancelled.
        """
        ...
