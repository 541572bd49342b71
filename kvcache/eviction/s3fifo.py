"""S3-FIFO eviction: a small probation queue, a main queue and a ghost list.

New blocks enter the small queue (about a tenth of the bytes). A block leaving
the small queue moves to the main queue only if it was read while there;
otherwise it is evicted and its key remembered in the ghost list, so that if
it comes back soon it goes straight to main. The main queue is a FIFO with a
small frequency counter: a block read since it was last examined is given
another round instead of being evicted.

When it helps: workloads where most blocks are the unique tail of one prompt
and never read again while some prefixes (popular documents) are read often;
the small queue filters the first kind out before they can displace the
second. Where reuse comes late (a chat's next turn), LRU does better; see
`kvcache.eviction` for the measurements behind the default.

NOTE: queue sizes are in bytes, since blocks of different namespaces can have
different sizes; the ghost list is bounded by entry count (keys only).
"""

from __future__ import annotations

from collections import OrderedDict

from kvcache.keys import BlockKey

_MAX_FREQ = 3


class S3FIFOPolicy:
    """S3-FIFO over byte-sized entries.

    Args:
        capacity_bytes: the owner's byte budget; the small queue gets
            `small_fraction` of it.
        small_fraction: share of the budget for the probation queue.
    """

    __slots__ = (
        "_small",
        "_main",
        "_ghost",
        "_freq",
        "_size",
        "_small_bytes",
        "_small_target",
    )

    def __init__(self, capacity_bytes: int, small_fraction: float = 0.1) -> None:
        self._small: OrderedDict[BlockKey, None] = OrderedDict()
        self._main: OrderedDict[BlockKey, None] = OrderedDict()
        self._ghost: OrderedDict[BlockKey, None] = OrderedDict()
        self._freq: dict[BlockKey, int] = {}
        self._size: dict[BlockKey, int] = {}
        self._small_bytes = 0
        self._small_target = max(1, int(capacity_bytes * small_fraction))

    def insert(self, key: BlockKey, size: int) -> None:
        self._freq[key] = 0
        self._size[key] = size
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
            self._small_bytes += size

    def hit(self, key: BlockKey) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < _MAX_FREQ:
            self._freq[key] = freq + 1

    def remove(self, key: BlockKey) -> None:
        if key not in self._freq:
            return
        del self._freq[key]
        size = self._size.pop(key)
        if key in self._small:
            del self._small[key]
            self._small_bytes -= size
        else:
            self._main.pop(key, None)

    def evict(self) -> BlockKey | None:
        while self._small or self._main:
            if self._small and (self._small_bytes >= self._small_target or not self._main):
                key, _ = self._small.popitem(last=False)
                self._small_bytes -= self._size[key]
                if self._freq[key] > 0:
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                self._remember(key)
                return self._forget(key)
            key, _ = self._main.popitem(last=False)
            freq = self._freq[key]
            if freq > 0:
                self._freq[key] = freq - 1
                self._main[key] = None
                continue
            return self._forget(key)
        return None

    def _forget(self, key: BlockKey) -> BlockKey:
        del self._freq[key]
        del self._size[key]
        return key

    def _remember(self, key: BlockKey) -> None:
        self._ghost[key] = None
        limit = max(len(self._freq), 16)
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._freq)
