"""The interface every tier implements, and the values it exchanges.

A tier stores frames (see `kvcache.framing`) under `BlockKey`s. It is a dumb
byte store with one duty beyond storage: `get` checks each frame before
returning it, and turns a frame that fails the check into a miss (counted in
``kvgate_kvcache_checksum_failures_total``). Policy (which tier first,
promotion, write-behind, what to do when a tier is down) belongs to
`kvcache.store.TieredStore`, not to tiers.

Failures: a tier that cannot serve a call raises a `kvcache.errors.TierError`
subclass, never a library's own exception type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from kvcache.framing import Buffer
from kvcache.keys import BlockKey

#: Where a hit came from, in vLLM's vocabulary (`vllm:prompt_tokens_cached_by_source`).
HitSource = Literal["host", "p2p", "disk"]


@dataclass(frozen=True, slots=True)
class Usage:
    """How full a tier is.

    Attributes:
        bytes_used: bytes the tier's data takes (frames, or the server's own
            accounting for Redis).
        capacity_bytes: the budget, or None when the tier has none.
        blocks: number of stored blocks, or None when the tier cannot tell
            cheaply.
    """

    bytes_used: int
    capacity_bytes: int | None
    blocks: int | None


class Tier(Protocol):
    """A store of framed blocks: one level of the KV cache."""

    @property
    def name(self) -> str:
        """Metric label and log name (``l1``, ``l2``, ``l3``)."""
        ...

    @property
    def source(self) -> HitSource:
        """How vLLM should label tokens this tier supplied."""
        ...

    async def start(self) -> None:
        """Connect and load what the tier needs; idempotent."""
        ...

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key is stored (without checking its frame).

        Raises:
            TierError: the tier cannot answer.
        """
        ...

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        """The checked frame of each key, or None (absent or corrupt).

        Raises:
            TierError: the tier cannot answer.
        """
        ...

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> None:
        """Store frames; a key already stored is overwritten.

        Raises:
            TierError: the tier did not take the writes.
        """
        ...

    async def usage(self) -> Usage:
        """Current fill level.

        Raises:
            TierError: the tier cannot answer.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and threads; idempotent."""
        ...
