"""The tiered block store: L1 → L2 → L3 with promotion and write-behind.

Reads ask each tier in order for the keys still missing and promote what a
lower tier found into the tiers above it. Writes go inline to the first
`inline_tiers` tiers (L1: a dict insert) and behind the request path to the
others, through one bounded queue per tier; what does not fit, or meets a tier
that is down, is dropped and counted, never waited for.

A tier that fails (a retryable `TierError`, or no answer within
`op_timeout_s`) is marked down and skipped (counted in
``kvgate_kvcache_tier_skipped_total``) for `retry_after_s`, doubling per
consecutive failure up to `max_retry_after_s`; the first call after that
probes it again. A permanent refusal (`TierRejected`: a block too large, a
request the tier will never take) costs only that call: its writes are
dropped (reason ``rejected``) or its reads missed, it is counted in
``kvgate_kvcache_tier_rejections_total``, and the tier stays in use. No tier
failure ever reaches the caller as an exception: a down tier only costs hits.

Who uses it: the vLLM connector (`kvcache.vllm_connector`), on an event loop of
its own; benchmarks and tests. Not thread-safe: one event loop owns a store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

from kvcache.errors import TierError, TierTimeout
from kvcache.framing import Buffer
from kvcache.keys import BlockKey
from kvcache.metrics import StoreMetrics
from kvcache.tiers.base import HitSource, Tier

log = logging.getLogger(__name__)

_R = TypeVar("_R")
#: How one tier call went (see `TieredStore._call`).
_Outcome = Literal["ok", "skipped", "failed", "rejected"]


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Behaviour of the tiered store.

    Attributes:
        inline_tiers: how many leading tiers are written on the caller's
            path (default 1: L1); the rest are written behind it.
        write_queue_bytes: most frame bytes queued per write-behind tier
            (default 256 MiB); beyond that new writes are dropped and counted.
        write_batch_bytes: most frame bytes per write-behind call (16 MiB).
        op_timeout_s: deadline of one call to a tier (default 2 s), on top
            of the tier's own.
        retry_after_s: how long a failed tier is skipped at first (1 s).
        max_retry_after_s: cap of the doubling skip period (30 s).
    """

    inline_tiers: int = 1
    write_queue_bytes: int = 256 << 20
    write_batch_bytes: int = 16 << 20
    op_timeout_s: float = 2.0
    retry_after_s: float = 1.0
    max_retry_after_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Found:
    """A block found by a read.

    Attributes:
        tier: name of the tier that served it.
        source: how vLLM labels tokens from that tier.
        frame: the checked frame (`kvcache.framing.payload_of` gives the payload).
    """

    tier: str
    source: HitSource
    frame: Buffer


class _Health:
    __slots__ = ("down_until", "failures")

    def __init__(self) -> None:
        self.down_until = 0.0
        self.failures = 0


class _WriteQueue:
    __slots__ = ("items", "bytes", "wake", "idle", "task")

    def __init__(self) -> None:
        self.items: deque[tuple[BlockKey, Buffer, int]] = deque()
        self.bytes = 0
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None


class TieredStore:
    """Tiers composed into one block store.

    Args:
        tiers: fastest first (L1, L2, L3); the store owns and closes them.
        metrics: where to count (on a registry the owner exposes).
        settings: queue bounds, deadlines, skip periods.
        clock: monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        metrics: StoreMetrics,
        settings: StoreSettings = StoreSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tiers = list(tiers)
        self.metrics = metrics
        self.settings = settings
        self._clock = clock
        self._health = {tier.name: _Health() for tier in self.tiers}
        for tier in self.tiers:
            metrics.prime(tier.name)
        self._queues: dict[str, _WriteQueue] = {}
        self._started = False

    async def start(self) -> None:
        """Start every tier (a tier that cannot start is marked down) and the writers."""
        if self._started:
            return
        self._started = True
        for index, tier in enumerate(self.tiers):
            self.metrics.tier_up.labels(tier.name).set(1)
            try:
                async with asyncio.timeout(self.settings.op_timeout_s):
                    await tier.start()
            except (TierError, TimeoutError) as exc:
                self._failed(tier, "start", exc)
            if index >= self.settings.inline_tiers:
                queue = _WriteQueue()
                queue.task = asyncio.create_task(self._writer(tier, queue), name=f"kvcache-writer-{tier.name}")
                self._queues[tier.name] = queue

    def is_up(self, tier: Tier) -> bool:
        """Whether calls to `tier` are made now (False while it is skipped)."""
        return self._health[tier.name].down_until <= self._clock()

    def _failed(self, tier: Tier, op: str, exc: BaseException) -> None:
        health = self._health[tier.name]
        health.failures += 1
        pause = min(
            self.settings.retry_after_s * 2 ** (health.failures - 1), self.settings.max_retry_after_s
        )
        health.down_until = self._clock() + pause
        self.metrics.failures.labels(tier.name, op, type(exc).__name__).inc()
        self.metrics.tier_up.labels(tier.name).set(0)
        log.warning("tier %s down for %.1fs after %s failed: %s", tier.name, pause, op, exc)

    def _rejected(self, tier: Tier, op: str, exc: TierError) -> None:
        self.metrics.rejections.labels(tier.name, op).inc()
        log.warning("tier %s refused a %s (the tier stays in use): %s", tier.name, op, exc)

    def _succeeded(self, tier: Tier) -> None:
        health = self._health[tier.name]
        if health.failures:
            health.failures = 0
            self.metrics.tier_up.labels(tier.name).set(1)
            log.info("tier %s is back", tier.name)

    async def _call(self, tier: Tier, op: str, call: Callable[[], Awaitable[_R]]) -> tuple[_Outcome, _R | None]:
        """Run one tier call with the deadline, timing and failure accounting.

        Args:
            tier: the tier.
            op: metric label of the call.
            call: makes the call's awaitable (not made when the tier is skipped).

        Returns:
            ("ok", result), or (why not, None): "skipped" (the tier is
            down), "failed" (it failed now and is marked down) or "rejected"
            (it refused this call for good and stays up).
        """
        if not self.is_up(tier):
            self.metrics.skipped.labels(tier.name, op).inc()
            return "skipped", None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.op_timeout_s):
                result = await call()
        except TimeoutError:
            self._failed(tier, op, TierTimeout(tier.name, f"{op} took over {self.settings.op_timeout_s}s"))
            return "failed", None
        except TierError as exc:
            if not exc.retryable:
                self._rejected(tier, op, exc)
                return "rejected", None
            self._failed(tier, op, exc)
            return "failed", None
        self.metrics.seconds.labels(tier.name, op).observe(time.perf_counter() - started)
        self._succeeded(tier)
        return "ok", result

    async def exists(self, keys: Sequence[BlockKey]) -> list[str | None]:
        """Which tier (first in order) holds each key, or None.

        Frames are not checked: a key reported here may still fail its check
        when read.
        """
        where: list[str | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for tier in self.tiers:
            if not pending:
                break
            asked = [keys[i] for i in pending]
            outcome, found = await self._call(tier, "exists", partial(tier.exists, asked))
            if outcome != "ok" or found is None:
                continue
            pending_next = []
            for index, present in zip(pending, found):
                if present:
                    where[index] = tier.name
                else:
                    pending_next.append(index)
            pending = pending_next
        return where

    async def get(self, keys: Sequence[BlockKey], *, promote: bool = True) -> list[Found | None]:
        """Read blocks through the tiers, fastest first.

        Args:
            keys: blocks to read.
            promote: copy what a lower tier found into the tiers above it
                (inline for L1, behind for the others).

        Returns:
            One `Found` or None per key, in order. Counts hits per tier,
            misses, bytes and latency.
        """
        results: list[Found | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not pending:
                break
            asked = [keys[i] for i in pending]
            outcome, frames = await self._call(tier, "get", partial(tier.get, asked))
            if outcome != "ok" or frames is None:
                continue
            found: list[tuple[BlockKey, Buffer]] = []
            pending_next = []
            for index, frame in zip(pending, frames):
                if frame is None:
                    pending_next.append(index)
                    continue
                results[index] = Found(tier.name, tier.source, frame)
                found.append((keys[index], frame))
            pending = pending_next
            if found:
                self.metrics.hits.labels(tier.name).inc(len(found))
                self.metrics.bytes.labels(tier.name, "get").inc(sum(memoryview(f).nbytes for _, f in found))
                if promote and level:
                    await self._write(found, upto=level)
        if pending:
            self.metrics.misses.inc(len(pending))
        return results

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> None:
        """Store frames in every tier: inline in the first ones, behind in the rest.

        Returns once the inline tiers hold the frames; the write-behind tiers
        get them later (see `flush`), or drop and count them.
        """
        await self._write(items, upto=len(self.tiers))

    async def _write(self, items: Sequence[tuple[BlockKey, Buffer]], *, upto: int) -> None:
        inline = self.settings.inline_tiers
        for tier in self.tiers[: min(inline, upto)]:
            outcome, _ = await self._call(tier, "put", partial(tier.put, items))
            size = sum(memoryview(f).nbytes for _, f in items)
            if outcome == "ok":
                self.metrics.bytes.labels(tier.name, "put").inc(size)
            else:
                self._drop(tier, "rejected" if outcome == "rejected" else "tier_down", len(items), size)
        for tier in self.tiers[inline:upto]:
            self._enqueue(tier, items)

    def _enqueue(self, tier: Tier, items: Sequence[tuple[BlockKey, Buffer]]) -> None:
        queue = self._queues.get(tier.name)
        if queue is None:  # not started
            return
        limit = self.settings.write_queue_bytes
        for key, frame in items:
            size = memoryview(frame).nbytes
            if not self.is_up(tier):
                self._drop(tier, "tier_down", 1, size)
            elif queue.bytes + size > limit:
                self._drop(tier, "queue_full", 1, size)
            else:
                queue.items.append((key, frame, size))
                queue.bytes += size
                queue.idle.clear()
                queue.wake.set()
        self.metrics.pending_write_bytes.labels(tier.name).set(queue.bytes)

    def _drop(self, tier: Tier, reason: str, blocks: int, size: int) -> None:
        self.metrics.dropped_writes.labels(tier.name, reason).inc(blocks)
        self.metrics.dropped_bytes.labels(tier.name).inc(size)

    async def _writer(self, tier: Tier, queue: _WriteQueue) -> None:
        limit = self.settings.write_batch_bytes
        while True:
            if not queue.items:
                queue.idle.set()
                queue.wake.clear()
                await queue.wake.wait()
                continue
            batch: list[tuple[BlockKey, Buffer]] = []
            size = 0
            while queue.items and (not batch or size + queue.items[0][2] <= limit):
                key, frame, length = queue.items.popleft()
                batch.append((key, frame))
                size += length
            queue.bytes -= size
            self.metrics.pending_write_bytes.labels(tier.name).set(queue.bytes)
            if not self.is_up(tier):
                self._drop(tier, "tier_down", len(batch), size)
                continue
            outcome, _ = await self._call(tier, "put", partial(tier.put, batch))
            if outcome == "ok":
                self.metrics.bytes.labels(tier.name, "put").inc(size)
            else:
                self._drop(tier, "rejected" if outcome == "rejected" else "write_failed", len(batch), size)

    async def flush(self) -> None:
        """Wait until every write-behind queue is empty and its last batch done."""
        for queue in self._queues.values():
            await queue.idle.wait()

    async def aclose(self, *, flush_timeout_s: float = 5.0) -> None:
        """Flush (within the timeout), stop the writers and close every tier."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_timeout_s):
                await self.flush()
        for queue in self._queues.values():
            if queue.task is not None:
                queue.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await queue.task
        self._queues.clear()
        for tier in self.tiers:
            await tier.aclose()
