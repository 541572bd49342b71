"""One bad entry costs one block (or one member), never a tier.

A directory L3 with a directory or a huge file where a block's file goes, a
membership hash with entries something else wrote, a corrupt L3 block that the
tier is not allowed to delete: each is a counted miss or a skipped entry, and
every other block and member is still served.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.errors import ConfigError
from kvcache.membership import RedisMembership
from kvcache.metrics import StoreMetrics
from kvcache.ring import NodeInfo
from kvcache.tiers import DiskTier, RedisTier
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import RedisServer, leftover_tasks

MiB = 1 << 20


def sample(metrics: StoreMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"kvgate_kvcache_{name}", labels) or 0.0


async def test_a_directory_where_a_block_file_goes_costs_that_block_only(tmp_path: Path) -> None:
    metrics = StoreMetrics(CollectorRegistry())
    tier = DiskTier(tmp_path / "l3", 64 * MiB, metrics=metrics)
    await tier.start()
    try:
        tier.path_of(key(0)).mkdir(parents=True)
        await tier.put([(key(0), frame(0, 1024)), (key(1), frame(1, 1024))])
        got = await tier.get([key(0), key(1)])
        assert got[0] is None and got[1] is not None and bytes(got[1]) == bytes(frame(1, 1024))
        assert sample(metrics, "checksum_failures_total", tier="l3", reason="unreadable") == 1
    finally:
        await tier.aclose()


async def test_a_file_larger_than_the_budget_is_never_read(tmp_path: Path) -> None:
    metrics = StoreMetrics(CollectorRegistry())
    tier = DiskTier(tmp_path / "l3", 1 * MiB, metrics=metrics)
    await tier.start()
    try:
        planted = tier.path_of(key(0))
        planted.parent.mkdir(parents=True)
        with open(planted, "wb") as file:
            file.truncate(256 * MiB)  # sparse: costs no disk, would cost 256 MiB read
        tracemalloc.start()
        try:
            got = await tier.get([key(0)])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got == [None]
        assert peak < 8 * MiB, f"reading the planted file allocated {peak} bytes"
        assert sample(metrics, "checksum_failures_total", tier="l3", reason="length") == 1
        assert not planted.exists()
    finally:
        await tier.aclose()


async def test_member_entries_written_by_something_else_are_skipped(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        membership = RedisMembership(server.url, cluster="t", ttl_s=60)
        await membership.register(NodeInfo.make("good", "127.0.0.1:7001", {"host": "h"}))
        sync = server.client()
        far = 1 << 60
        for name, raw in {
            "not-json": "{",
            "no-expiry": json.dumps({"id": "x", "address": "127.0.0.1:1"}),
            "a-list": "[1, 2]",
            "bad-address": json.dumps({"id": "y", "address": "nowhere", "expires_ms": far}),
            "bad-labels": json.dumps({"id": "z", "address": "127.0.0.1:2", "labels": [1], "expires_ms": far}),
        }.items():
            sync.hset("kvgate:kvcache:t:members", name, raw)
        sync.close()
        assert [m.node_id for m in await membership.members()] == ["good"]
        await membership.aclose()
    finally:
        server.stop()
    assert await leftover_tasks() == []


async def test_a_corrupt_block_the_tier_may_not_delete_costs_no_other_read(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        sync = server.client()
        sync.acl_setuser("nodel", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-del", "-unlink"])
        sync.set(b"kvgate:kv:" + key(0), b"not a frame")
        sync.set(b"kvgate:kv:" + key(1), bytes(frame(1, 1024)))
        sync.close()
        metrics = StoreMetrics(CollectorRegistry())
        tier = RedisTier(f"redis://nodel:secret@127.0.0.1:{server.port}/0", metrics=metrics, ttl_s=60)
        await tier.start()
        try:
            got = await tier.get([key(0), key(1)])
            assert got[0] is None and got[1] is not None and bytes(got[1]) == bytes(frame(1, 1024))
        finally:
            await tier.aclose()
    finally:
        server.stop()


@pytest.mark.parametrize("spec", ["a=h:0", "a=h:65536", "a=h:99999999999999999999", "a=h:", "a=:80", "h"])
def test_node_specs_with_impossible_ports_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        NodeInfo.parse(spec)
