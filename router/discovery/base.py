"""Discovery: which pods exist. Health and load are the monitor's business, not discovery's.

A discovery source calls its `OnChange` with the whole set of `PodEndpoint`s
each time the set changes; the gateway hands that to the monitor (pod table,
probes) and to the KV event listener (one subscription per publishing pod).
Implementations: `static` (a fixed list of URLs) and `kubernetes` (a pod
watch). `router.discovery.make_discovery` picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from router.pods import PodEndpoint

OnChange = Callable[[frozenset[PodEndpoint]], None]


class Discovery(Protocol):
    """A source of pods."""

    async def run(self, on_change: OnChange) -> None:
        """Call `on_change` with the whole set of pods now and whenever it changes.

        Runs until cancelled.
        """
        ...
