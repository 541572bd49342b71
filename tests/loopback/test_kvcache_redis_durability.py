"""L3 on Redis: what an acknowledged write survives.

The promise (kvcache/tiers/redis.py): with AOF on, every block whose SET Redis
acknowledged is still there after the Redis process is killed with SIGKILL and
restarted on the same data directory, whatever the fsync policy. The control
case shows the test can fail: without AOF, the same kill loses everything.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.errors import TierError
from kvcache.metrics import StoreMetrics
from kvcache.tiers import RedisTier
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import RedisServer, leftover_tasks

BLOCK = 32 << 10


@pytest.mark.parametrize(
    "appendfsync", [pytest.param("everysec", id="aof-everysec"), pytest.param("always", id="aof-always")]
)
async def test_every_acknowledged_write_survives_sigkill_and_restart(tmp_path: Path, appendfsync: str) -> None:
    server = RedisServer(tmp_path, appendonly=True, appendfsync=appendfsync)
    server.start()
    acknowledged: list[int] = []
    try:
        tier = RedisTier(server.url, timeout_s=10.0, metrics=StoreMetrics(CollectorRegistry()))
        await tier.start()
        assert tier.aof_enabled
        killed = asyncio.Event()

        async def writer() -> None:
            batch = 0
            while True:
                indices = list(range(batch * 8, batch * 8 + 8))
                try:
                    await tier.put([(key(i), frame(i, BLOCK)) for i in indices])
                except TierError:
                    if killed.is_set():
                        return  # the server is gone: this batch was never acknowledged
                    continue  # a slow fsync on a busy disk: not acknowledged, try again
                acknowledged.extend(indices)
                batch += 1

        writing = asyncio.create_task(writer())
        deadline = asyncio.get_running_loop().time() + 120
        while len(acknowledged) < 400:
            assert asyncio.get_running_loop().time() < deadline, f"only {len(acknowledged)} writes acknowledged"
            await asyncio.sleep(0.01)
        server.kill()  # mid-stream, with no pause for an fsync
        killed.set()
        await asyncio.wait_for(writing, 60)
        await tier.aclose()

        server.start()
        tier = RedisTier(server.url, metrics=StoreMetrics(CollectorRegistry()))
        got = await tier.get([key(i) for i in acknowledged])
        await tier.aclose()
        lost = [i for i, g in zip(acknowledged, got) if g is None or bytes(g) != bytes(frame(i, BLOCK))]
        assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged blocks lost"
    finally:
        server.stop()
    assert await leftover_tasks() == []


async def test_without_aof_a_sigkill_loses_the_blocks(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=False)
    server.start()
    try:
        tier = RedisTier(server.url)
        await tier.start()
        assert tier.aof_enabled is False
        await tier.put([(key(i), frame(i, BLOCK)) for i in range(50)])
        await tier.aclose()
        server.kill()
        server.start()
        tier = RedisTier(server.url)
        assert await tier.exists([key(i) for i in range(50)]) == [False] * 50
        await tier.aclose()
    finally:
        server.stop()
