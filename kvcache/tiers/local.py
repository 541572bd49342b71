"""L1: blocks in this process's memory, within a byte budget.

The frame given to `put` is stored as is (no copy): callers hand over a frame
they will not modify. `get` returns a view of the stored frame (no copy) after
checking it, so a block corrupted in memory is still a miss, never KV handed
to an engine. Eviction order comes from a policy in `kvcache.eviction`.

The synchronous methods (`get_frame`, `put_frame`, ...) are the real work; the
async `Tier` methods wrap them for the tiered store. Not thread-safe: one
event loop (or one thread) owns an instance.

Also used by the cache node (`kvcache.server`) as its block storage, with
checking left to the clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from kvcache.errors import ConfigError, CorruptBlock
from kvcache.eviction import DEFAULT_POLICY, make_policy
from kvcache.framing import Buffer, corruption_reason, open_frame
from kvcache.keys import BlockKey
from kvcache.metrics import StoreMetrics
from kvcache.tiers.base import HitSource, Usage

#: Called with ("put" | "evict" | "delete", key) after each change.
ChangeListener = Callable[[str, BlockKey], None]


class LocalTier:
    """An in-memory block store with a byte budget.

    Args:
        capacity_bytes: budget for the frames held; a frame larger than the
            whole budget is refused.
        policy: eviction policy name (`kvcache.eviction.POLICIES`).
        verify_reads: check frames on `get` (on by default; the cache node
            turns it off and leaves checking to its clients).
        name: metric label.
        metrics: where to count evictions, stored bytes and corrupt frames.
        listener: told of every put, eviction and delete (the vLLM connector
            uses it to tell its scheduler what L1 holds).
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        policy: str = DEFAULT_POLICY,
        verify_reads: bool = True,
        name: str = "l1",
        metrics: StoreMetrics | None = None,
        listener: ChangeListener | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ConfigError(f"L1 capacity must be positive, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._policy = make_policy(policy, capacity_bytes)
        self._verify = verify_reads
        self._name = name
        self._metrics = metrics
        self._listener = listener
        self._frames: dict[BlockKey, Buffer] = {}
        self._used = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def source(self) -> HitSource:
        return "host"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._frames)

    def __contains__(self, key: object) -> bool:
        return key in self._frames

    def keys(self) -> Iterator[BlockKey]:
        """The resident keys (a snapshot, safe to iterate while mutating)."""
        return iter(list(self._frames))

    def peek(self, key: BlockKey) -> Buffer | None:
        """The stored frame, unchecked, without counting a read."""
        return self._frames.get(key)

    def get_frame(self, key: BlockKey) -> Buffer | None:
        """The frame of `key` (checked unless `verify_reads` is off), or None.

        A frame that fails its check is deleted and counted.
        """
        frame = self._frames.get(key)
        if frame is None:
            return None
        if self._verify:
            try:
                open_frame(key, frame)
            except CorruptBlock as exc:
                if self._metrics is not None:
                    self._metrics.checksum_failures.labels(self._name, corruption_reason(exc)).inc()
                self.delete(key)
                return None
        self._policy.hit(key)
        return frame

    def put_frame(self, key: BlockKey, frame: Buffer) -> bool:
        """Store a frame, evicting until it fits.

        Returns:
            False if the frame is larger than the whole budget (not stored).
        """
        size = memoryview(frame).nbytes
        if size > self._capacity:
            return False
        if key in self._frames:
            self._drop(key)
        while self._used + size > self._capacity:
            victim = self._policy.evict()
            if victim is None:  # pragma: no cover - policy and dict disagree
                break
            self._used -= memoryview(self._frames.pop(victim)).nbytes
            if self._metrics is not None:
                self._metrics.evictions.labels(self._name).inc()
            if self._listener is not None:
                self._listener("evict", victim)
        self._frames[key] = frame
        self._policy.insert(key, size)
        self._used += size
        self._report()
        if self._listener is not None:
            self._listener("put", key)
        return True

    def delete(self, key: BlockKey) -> bool:
        """Remove a block; returns whether it was resident."""
        if key not in self._frames:
            return False
        self._drop(key)
        self._report()
        if self._listener is not None:
            self._listener("delete", key)
        return True

    def clear(self) -> None:
        """Remove every block."""
        for key in list(self._frames):
            self.delete(key)

    def _drop(self, key: BlockKey) -> None:
        self._used -= memoryview(self._frames.pop(key)).nbytes
        self._policy.remove(key)

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.stored_bytes.labels(self._name).set(self._used)

    # The `Tier` protocol.

    async def start(self) -> None:
        return None

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        return [key in self._frames for key in keys]

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        return [self.get_frame(key) for key in keys]

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> None:
        for key, frame in items:
            self.put_frame(key, frame)

    async def usage(self) -> Usage:
        return Usage(bytes_used=self._used, capacity_bytes=self._capacity, blocks=len(self._frames))

    async def aclose(self) -> None:
        return None
