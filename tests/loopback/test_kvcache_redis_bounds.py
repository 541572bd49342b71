"""L3 on Redis cannot grow without bound unnoticed: the memory policy is checked, blocks expire, OOM is no outage.

Each test runs its own redis-server on a free port in a temporary directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.errors import ConfigError
from kvcache.metrics import StoreMetrics
from kvcache.store import TieredStore
from kvcache.tiers import RedisTier
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import RedisServer, leftover_tasks

MiB = 1 << 20


@pytest.mark.parametrize(
    ("maxmemory", "policy", "ttl_s", "problem"),
    [
        pytest.param(None, "allkeys-lru", 3600.0, "no maxmemory", id="no-maxmemory"),
        pytest.param(64 * MiB, "noeviction", 3600.0, "noeviction", id="noeviction"),
        pytest.param(64 * MiB, "volatile-lru", None, "volatile-lru", id="volatile-without-ttl"),
        pytest.param(64 * MiB, "volatile-lru", 3600.0, None, id="volatile-with-ttl"),
        pytest.param(64 * MiB, "allkeys-lru", None, None, id="allkeys-lru"),
    ],
)
@pytest.mark.parametrize("config_command", [pytest.param(True, id="config"), pytest.param(False, id="config-disabled")])
async def test_an_unbounded_redis_is_warned_about_or_refused(
    tmp_path: Path, maxmemory: int | None, policy: str, ttl_s: float | None, problem: str | None, config_command: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    extra = () if config_command else ("--rename-command", "CONFIG", "")
    server = RedisServer(tmp_path, maxmemory=maxmemory, maxmemory_policy=policy, extra_args=extra)
    server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="kvcache.tiers.redis"):
            tier = RedisTier(server.url, ttl_s=ttl_s)
            await tier.start()
            await tier.aclose()
        if problem is None:
            assert tier.unbounded_reason is None
            assert not caplog.records
        else:
            assert problem in (tier.unbounded_reason or "")
            assert any(problem in r.getMessage() for r in caplog.records)
            refusing = RedisTier(server.url, ttl_s=ttl_s, unbounded="refuse")
            with pytest.raises(ConfigError, match=problem):
                await refusing.start()
            await refusing.aclose()
    finally:
        server.stop()


async def test_every_block_is_written_with_its_expiry_and_a_read_renews_it(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, maxmemory=64 * MiB)
    server.start()
    try:
        tier = RedisTier(server.url, ttl_s=100)
        await tier.start()
        await tier.put([(key(i), frame(i, 1024)) for i in range(10)])
        sync = server.client()
        names = [tier.redis_key(key(i)) for i in range(10)]
        assert all(90_000 < sync.pttl(name) <= 100_000 for name in names)
        sync.pexpire(names[0], 5_000)
        assert (await tier.get([key(0)]))[0] is not None
        assert sync.pttl(names[0]) > 90_000, "a read renews the expiry"
        sync.close()
        await tier.aclose()
    finally:
        server.stop()
    assert await leftover_tasks() == []


async def test_a_full_noeviction_redis_refuses_writes_but_l3_stays_in_use_for_reads(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, maxmemory=3 * MiB, maxmemory_policy="noeviction")
    server.start()
    metrics = StoreMetrics(CollectorRegistry())
    try:
        l3 = RedisTier(server.url, ttl_s=3600, metrics=metrics)
        store = TieredStore([l3], metrics=metrics)
        await store.start()
        try:
            written = 0
            for i in range(200):  # 200 x 64 KiB = 12.5 MiB, far beyond 3 MiB
                await store.put([(key(i), frame(i, 64 << 10))])
                await store.flush()
                written += 1
                if metrics.registry.get_sample_value(
                    "kvgate_kvcache_dropped_writes_total", {"tier": "l3", "reason": "rejected"}
                ):
                    break
            assert written < 200, "the server never ran out of memory"
            assert store.is_up(l3), "an out-of-memory refusal must not take L3 down"
            found = await store.get([key(0)])
            assert found[0] is not None and found[0].tier == "l3"
        finally:
            await store.aclose()
    finally:
        server.stop()
