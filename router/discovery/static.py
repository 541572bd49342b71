"""Static discovery: the pods named by `--worker-urls` or the config file.

Static pods are known by URL only; their KV event endpoints, if any, come
from `discovery.kv_event_sources`, which the gateway reads itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from router.discovery.base import OnChange
from router.pods import PodEndpoint


class StaticDiscovery:
    """A fixed set of pods.

    Args:
        urls: the pods' base URLs.
    """

    def __init__(self, urls: Iterable[str]) -> None:
        self.urls = frozenset(url.rstrip("/") for url in urls)

    async def run(self, on_change: OnChange) -> None:
        on_change(frozenset(PodEndpoint.of(url) for url in self.urls))
        await asyncio.Event().wait()  # nothing ever changes
