"""One contract, every tier: L1 memory, L2 over real gRPC nodes, Redis, a directory.

Each tier runs against real servers on 127.0.0.1 (cache nodes on port 0, a
private redis-server) and must: return what was put, report what exists, move
batches (split under the message cap, large frames streamed), stay within its
byte budget when overfilled, serve concurrent callers consistently, and turn a
damaged or misplaced frame into a counted miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.keys import BlockKey
from kvcache.membership import StaticMembership
from kvcache.metrics import StoreMetrics
from kvcache.tiers import DiskTier, LocalTier, PeerTier, RedisTier, Tier
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import RedisServer, leftover_tasks, run_nodes

CAPACITY = 4 << 20
BLOCK = 64 << 10


@dataclass
class Harness:
    tier: Tier
    metrics: StoreMetrics
    #: Damage the stored bytes of a key behind the tier's back.
    corrupt: Callable[[BlockKey], Awaitable[None]]

    def checksum_failures(self, reason: str = "checksum") -> float:
        value = self.metrics.registry.get_sample_value(
            "kvgate_kvcache_checksum_failures_total", {"tier": self.tier.name, "reason": reason}
        )
        return value or 0.0


def _flip(frame_bytes: bytes | bytearray) -> bytes:
    damaged = bytearray(frame_bytes)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


@contextlib.asynccontextmanager
async def l1(tmp_path: Path) -> AsyncIterator[Harness]:
    metrics = StoreMetrics(CollectorRegistry())
    tier = LocalTier(CAPACITY, metrics=metrics)

    async def corrupt(k: BlockKey) -> None:
        stored = tier.peek(k)
        assert isinstance(stored, bytearray)
        stored[len(stored) // 2] ^= 0xFF  # in place: memory going bad under the cache

    yield Harness(tier, metrics, corrupt)


@contextlib.asynccontextmanager
async def l2(tmp_path: Path) -> AsyncIterator[Harness]:
    metrics = StoreMetrics(CollectorRegistry())
    limit = 1 << 20  # small message cap, so batches split and large frames stream
    async with run_nodes(2, capacity_bytes=CAPACITY // 2, max_message_bytes=limit) as (nodes, membership):
        tier = PeerTier(StaticMembership(await membership.members()), max_message_bytes=limit, metrics=metrics)
        await tier.start()

        async def corrupt(k: BlockKey) -> None:
            for node in nodes:
                stored = node.store.peek(k)
                if stored is not None:
                    node.store.put_frame(k, _flip(stored))

        try:
            yield Harness(tier, metrics, corrupt)
        finally:
            await tier.aclose()


@contextlib.asynccontextmanager
async def redis_tier(tmp_path: Path) -> AsyncIterator[Harness]:
    # Redis counts its own overhead (about 1 MiB) and the request buffers in
    # used_memory: give it room for the 1.5 MiB frame on top of that.
    server = RedisServer(tmp_path, maxmemory=2 * CAPACITY)
    server.start()
    metrics = StoreMetrics(CollectorRegistry())
    tier = RedisTier(server.url, metrics=metrics)
    await tier.start()

    async def corrupt(k: BlockKey) -> None:
        with server.client() as client:
            stored = client.get(tier.redis_key(k))
            client.set(tier.redis_key(k), _flip(stored))

    try:
        yield Harness(tier, metrics, corrupt)
    finally:
        await tier.aclose()
        server.stop()


@contextlib.asynccontextmanager
async def disk(tmp_path: Path) -> AsyncIterator[Harness]:
    metrics = StoreMetrics(CollectorRegistry())
    tier = DiskTier(tmp_path / "blocks", CAPACITY, metrics=metrics)
    await tier.start()

    async def corrupt(k: BlockKey) -> None:
        path = tier.path_of(k)
        path.write_bytes(_flip(path.read_bytes()))

    try:
        yield Harness(tier, metrics, corrupt)
    finally:
        await tier.aclose()


@pytest.fixture(
    params=[
        pytest.param(l1, id="l1-memory"),
        pytest.param(l2, id="l2-grpc-nodes"),
        pytest.param(redis_tier, id="l3-redis"),
        pytest.param(disk, id="l3-disk"),
    ]
)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with request.param(tmp_path) as h:
        yield h
    assert await leftover_tasks() == []


async def test_get_returns_what_put_stored(harness: Harness) -> None:
    frames = {key(i): frame(i) for i in range(5)}
    await harness.tier.put(list(frames.items()))
    got = await harness.tier.get([*frames, key(99)])
    assert [bytes(g) if g is not None else None for g in got] == [bytes(f) for f in frames.values()] + [None]


async def test_exists_reports_stored_keys_only(harness: Harness) -> None:
    await harness.tier.put([(key(1), frame(1)), (key(2), frame(2))])
    assert await harness.tier.exists([key(1), key(3), key(2)]) == [True, False, True]
    assert await harness.tier.exists([]) == []


async def test_a_batch_larger_than_one_message_round_trips(harness: Harness) -> None:
    items = [(key(i), frame(i, 48 << 10)) for i in range(50)]  # 2.4 MiB in one call
    await harness.tier.put(items)
    got = await harness.tier.get([k for k, _ in items])
    assert all(g is not None and bytes(g) == bytes(f) for g, (_, f) in zip(got, items))


async def test_a_frame_larger_than_a_message_round_trips(harness: Harness) -> None:
    big = frame(7, (3 << 20) // 2)  # 1.5 MiB: above the L2 message cap of 1 MiB
    await harness.tier.put([(key(7), big)])
    (got,) = await harness.tier.get([key(7)])
    assert got is not None and bytes(got) == bytes(big)


async def test_a_second_put_overwrites(harness: Harness) -> None:
    await harness.tier.put([(key(1), frame(1))])
    replacement = frame(1, 32 << 10)
    await harness.tier.put([(key(1), replacement)])
    (got,) = await harness.tier.get([key(1)])
    assert got is not None and bytes(got) == bytes(replacement)


async def test_overfilling_stays_within_the_byte_budget(harness: Harness) -> None:
    capacity = (await harness.tier.usage()).capacity_bytes
    assert capacity is not None
    count = 4 * capacity // BLOCK
    for start in range(0, count, 8):
        await harness.tier.put([(key(i), frame(i, BLOCK)) for i in range(start, start + 8)])
    usage = await harness.tier.usage()
    assert usage.capacity_bytes is not None
    assert usage.bytes_used <= usage.capacity_bytes
    present = await harness.tier.exists([key(i) for i in range(count)])
    assert present[-1], "the block written last must survive"
    assert 0 < sum(present) < count, "some blocks must have been evicted, not all"


async def test_concurrent_callers_see_consistent_blocks(harness: Harness) -> None:
    rng = random.Random(3)
    wrong: list[int] = []

    async def worker(offset: int) -> None:
        for round_ in range(5):
            indices = [offset * 100 + round_ * 4 + j for j in range(4)]
            await harness.tier.put([(key(i), frame(i, 16 << 10)) for i in indices])
            probe = indices + [rng.randrange(800)]
            for i, got in zip(probe, await harness.tier.get([key(i) for i in probe])):
                if got is not None and bytes(got) != bytes(frame(i, 16 << 10)):
                    wrong.append(i)

    await asyncio.gather(*(worker(n) for n in range(8)))
    assert wrong == []
    assert all(await harness.tier.exists([key(700 + 16 + j) for j in range(4)]))


async def test_a_damaged_frame_is_a_counted_miss(harness: Harness) -> None:
    await harness.tier.put([(key(1), frame(1)), (key(2), frame(2))])
    await harness.corrupt(key(1))
    got = await harness.tier.get([key(1), key(2)])
    assert got[0] is None
    assert got[1] is not None and bytes(got[1]) == bytes(frame(2))
    assert harness.checksum_failures("checksum") == 1


async def test_a_frame_stored_under_another_key_is_a_counted_miss(harness: Harness) -> None:
    await harness.tier.put([(key(2), frame(1))])
    assert await harness.tier.get([key(2)]) == [None]
    assert harness.checksum_failures("key") == 1
