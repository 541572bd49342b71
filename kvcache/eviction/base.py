"""The interface of an eviction policy.

A policy only keeps order: which resident key to drop next. The store owning
the bytes (`kvcache.tiers.local.LocalTier`, the cache node) tells it what was
inserted, read and removed, and asks it for victims until the new block fits.
Policies are synchronous and not thread-safe; their owner serialises calls.
"""

from __future__ import annotations

from typing import Protocol

from kvcache.keys import BlockKey


class EvictionPolicy(Protocol):
    """Chooses which resident block to evict next."""

    def insert(self, key: BlockKey, size: int) -> None:
        """Record a newly stored block of `size` bytes (not already resident)."""
        ...

    def hit(self, key: BlockKey) -> None:
        """Record a read of a resident block."""
        ...

    def remove(self, key: BlockKey) -> None:
        """Forget a block its owner deleted; unknown keys are ignored."""
        ...

    def evict(self) -> BlockKey | None:
        """Pick a victim, forget it and return it; None when nothing is resident."""
        ...

    def __len__(self) -> int:
        """Number of resident blocks the policy tracks."""
        ...
