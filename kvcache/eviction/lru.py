"""Least-recently-used eviction: the baseline policy.

Every read moves a block to the young end, so a burst of blocks read once (the
unique tail of a long prompt) pushes out blocks that are read again and again.
"""

from __future__ import annotations

from collections import OrderedDict

from kvcache.keys import BlockKey


class LRUPolicy:
    """Evicts the block read or written longest ago."""

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[BlockKey, None] = OrderedDict()

    def insert(self, key: BlockKey, size: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def hit(self, key: BlockKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        self._order.pop(key, None)

    def evict(self) -> BlockKey | None:
        if not self._order:
            return None
        key, _ = self._order.popitem(last=False)
        return key

    def __len__(self) -> int:
        return len(self._order)
