"""Static discovery: the pods named by `--worker-urls` or the config file."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from router.discovery.base import OnChange


class StaticDiscovery:
    def __init__(self, urls: Iterable[str]) -> None:
        self.urls = frozenset(url.rstrip("/") for url in urls)

    async def run(self, on_change: OnChange) -> None:
        on_change(self.urls)
        await asyncio.Event().wait()  # nothing ever changes
