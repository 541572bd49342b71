"""The tiered store over real tiers: read order, promotion, write-behind, down tiers.

L2 is two real gRPC cache nodes, L3 a directory or a private redis-server.
A tier that goes away must cost hits only: no exception reaches the caller,
and the skip is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.framing import Buffer
from kvcache.keys import BlockKey
from kvcache.membership import StaticMembership
from kvcache.metrics import StoreMetrics
from kvcache.store import StoreSettings, TieredStore
from kvcache.tiers import DiskTier, LocalTier, PeerTier, RedisTier
from kvcache.tiers.base import HitSource, Usage
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import RedisServer, leftover_tasks, run_nodes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(metrics: StoreMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"kvgate_kvcache_{name}", labels) or 0.0


@contextlib.asynccontextmanager
async def three_tiers(tmp_path: Path, clock: FakeClock | None = None) -> AsyncIterator[tuple[TieredStore, list]]:
    metrics = StoreMetrics(CollectorRegistry())
    async with run_nodes(2) as (nodes, membership):
        l1 = LocalTier(8 << 20, metrics=metrics)
        l2 = PeerTier(StaticMembership(await membership.members()), metrics=metrics, suspect_s=0.0)
        l3 = DiskTier(tmp_path / "l3", 64 << 20, metrics=metrics)
        store = TieredStore([l1, l2, l3], metrics=metrics, clock=clock or FakeClock())
        await store.start()
        try:
            yield store, nodes
        finally:
            await store.aclose()
    assert await leftover_tasks() == []


async def test_writes_reach_every_tier_and_reads_promote(tmp_path: Path) -> None:
    async with three_tiers(tmp_path) as (store, nodes):
        l1, l2, l3 = store.tiers
        items = [(key(i), frame(i)) for i in range(4)]
        await store.put(items)
        await store.flush()
        keys = [k for k, _ in items]
        assert await l2.exists(keys) == [True] * 4
        assert await l3.exists(keys) == [True] * 4

        assert isinstance(l1, LocalTier)
        l1.clear()
        found = await store.get(keys)
        assert [f.tier for f in found if f] == ["l2"] * 4
        assert [f.source for f in found if f] == ["p2p"] * 4
        assert all(k in l1 for k in keys), "an L2 hit is promoted into L1"

        l1.clear()
        for node in nodes:
            node.store.clear()
        found = await store.get(keys)
        assert [f.tier for f in found if f] == ["l3"] * 4
        await store.flush()
        assert all(k in l1 for k in keys)
        assert await l2.exists(keys) == [True] * 4, "an L3 hit is promoted into L2 behind the read"
        assert sample(store.metrics, "hits_total", tier="l3") == 4
        assert sample(store.metrics, "hits_total", tier="l2") == 4


async def test_exists_names_the_fastest_tier_holding_each_key(tmp_path: Path) -> None:
    async with three_tiers(tmp_path) as (store, nodes):
        l1, l2, l3 = store.tiers
        await l3.put([(key(1), frame(1))])
        await l2.put([(key(2), frame(2))])
        await l1.put([(key(3), frame(3))])
        assert await store.exists([key(1), key(2), key(3), key(4)]) == ["l3", "l2", "l1", None]


async def test_misses_are_counted(tmp_path: Path) -> None:
    async with three_tiers(tmp_path) as (store, _):
        assert await store.get([key(1), key(2)]) == [None, None]
        assert sample(store.metrics, "misses_total") == 2


async def test_stopped_l2_nodes_are_skipped_and_counted_and_retried_later(tmp_path: Path) -> None:
    clock = FakeClock()
    async with three_tiers(tmp_path, clock) as (store, nodes):
        l1, l2, l3 = store.tiers
        await store.put([(key(1), frame(1))])
        await store.flush()
        assert isinstance(l1, LocalTier)
        l1.clear()
        for node in nodes:
            await node.stop(0)

        found = await store.get([key(1)])  # must not raise
        assert found[0] is not None and found[0].tier == "l3"
        assert sample(store.metrics, "tier_failures_total", tier="l2", op="get", error="TierUnavailable") == 1
        assert sample(store.metrics, "tier_up", tier="l2") == 0

        l1.clear()
        await store.get([key(1)])
        assert sample(store.metrics, "tier_skipped_total", tier="l2", op="get") == 1

        before = sample(store.metrics, "dropped_writes_total", tier="l2", reason="tier_down")
        await store.put([(key(2), frame(2))])
        await store.flush()
        assert sample(store.metrics, "dropped_writes_total", tier="l2", reason="tier_down") == before + 1
        assert await l3.exists([key(2)]) == [True]

        clock.now += 60  # past the skip period: L2 is probed again (and fails again)
        l1.clear()
        await store.get([key(1)])
        assert sample(store.metrics, "tier_failures_total", tier="l2", op="get", error="TierUnavailable") == 2


async def test_a_killed_redis_is_skipped_and_counted(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    metrics = StoreMetrics(CollectorRegistry())
    store = TieredStore(
        [LocalTier(8 << 20, metrics=metrics), RedisTier(server.url, metrics=metrics, timeout_s=0.5)],
        metrics=metrics,
        clock=FakeClock(),
    )
    await store.start()
    try:
        await store.put([(key(1), frame(1))])
        await store.flush()
        server.kill()
        store.tiers[0].clear()  # type: ignore[attr-defined]
        assert await store.get([key(1)]) == [None]
        assert await store.exists([key(1)]) == [None]
        await store.put([(key(2), frame(2))])
        await store.flush()
        assert sample(metrics, "tier_failures_total", tier="l3", op="get", error="TierUnavailable") == 1
        assert sample(metrics, "tier_skipped_total", tier="l3", op="exists") == 1
        assert sample(metrics, "dropped_writes_total", tier="l3", reason="tier_down") == 1
    finally:
        await store.aclose()
        server.stop()


class GatedTier:
    """A real in-memory tier whose writes wait for a gate: a slow backend."""

    def __init__(self) -> None:
        self.inner = LocalTier(64 << 20, name="slow")
        self.gate = asyncio.Event()

    @property
    def name(self) -> str:
        return "slow"

    @property
    def source(self) -> HitSource:
        return "disk"

    async def start(self) -> None:
        return None

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        return await self.inner.exists(keys)

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        return await self.inner.get(keys)

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> None:
        await self.gate.wait()
        await self.inner.put(items)

    async def usage(self) -> Usage:
        return await self.inner.usage()

    async def aclose(self) -> None:
        return None


async def test_write_behind_is_bounded_and_drops_are_counted() -> None:
    metrics = StoreMetrics(CollectorRegistry())
    slow = GatedTier()
    block = 64 << 10
    store = TieredStore(
        [LocalTier(64 << 20, metrics=metrics), slow],
        metrics=metrics,
        settings=StoreSettings(write_queue_bytes=4 * (block + 100), op_timeout_s=30),
    )
    await store.start()
    try:
        for i in range(10):
            await store.put([(key(i), frame(i, block))])  # returns at once: L1 only
        assert all(key(i) in store.tiers[0] for i in range(10))  # type: ignore[operator]
        dropped = sample(metrics, "dropped_writes_total", tier="slow", reason="queue_full")
        assert 4 <= dropped <= 6, "the queue holds about 4 blocks (plus one batch in flight)"
        slow.gate.set()
        await store.flush()
        written = sum(await slow.exists([key(i) for i in range(10)]))
        assert written == 10 - dropped
    finally:
        await store.aclose()


@pytest.mark.parametrize("promote", [pytest.param(True, id="promote"), pytest.param(False, id="no-promote")])
async def test_promotion_can_be_turned_off(tmp_path: Path, promote: bool) -> None:
    async with three_tiers(tmp_path) as (store, _):
        l1, l2, l3 = store.tiers
        await l3.put([(key(1), frame(1))])
        await store.get([key(1)], promote=promote)
        await store.flush()
        assert (key(1) in l1) is promote  # type: ignore[operator]
        assert await l2.exists([key(1)]) == [promote]
