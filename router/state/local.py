"""`LocalState`: one gateway alone; nothing is shared, nothing waits."""

from __future__ import annotations

from collections.abc import Sequence

from kvcache.keys import BlockHash
from router.pods import Pod, PodId, UserId
from router.state.base import FleetView


class LocalState:
    """The routing state of a gateway without peers (no `--state-url`)."""

    synced = True

    async def start(self, view: FleetView) -> None:
        return None

    async def stop(self) -> None:
        return None

    def attach(self, pod: Pod) -> None:
        return None

    def reserved(self, pod: PodId, hashes: Sequence[BlockHash], uncached_tokens: int) -> None:
        return None

    def first_token(self, pod: PodId, uncached_tokens: int) -> None:
        return None

    def released(self, pod: PodId, uncached_tokens: int, decoding: bool) -> None:
        return None

    def charged(self, user: UserId, cost: float) -> None:
        return None

    def activity(self, user: UserId, active: int) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def settle(self) -> None:
        return None
