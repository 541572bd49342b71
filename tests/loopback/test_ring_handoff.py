"""Graceful leave hands every block to its new owner; a crash costs only its share.

In-process nodes for the counting tests; real ``kvgate cache-node`` processes,
registered in a private Redis, for SIGTERM and SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.membership import RedisMembership, StaticMembership
from kvcache.metrics import StoreMetrics
from kvcache.server import CacheNode
from kvcache.tiers import PeerTier
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import RedisServer, leftover_tasks, run_nodes, start_node

BLOCKS = 300


async def held(nodes: list[CacheNode]) -> int:
    return sum(len(node.store) for node in nodes)


@pytest.mark.parametrize("replicas", [pytest.param(1, id="R1"), pytest.param(2, id="R2")])
async def test_a_graceful_leave_loses_no_block(replicas: int) -> None:
    labels = [{"host": f"h{i}"} for i in range(4)]
    async with run_nodes(4, labels=labels, replicas=replicas) as (nodes, membership):
        client = PeerTier(membership, replicas=replicas, read_fallback=0, timeout_s=10.0, metrics=StoreMetrics(CollectorRegistry()))
        await client.start()
        try:
            await client.put([(key(i), frame(i, 4096)) for i in range(BLOCKS)])
            assert await held(nodes) == BLOCKS * replicas
            leaving = nodes[1]
            had = len(leaving.store)
            assert had > 0
            report = await leaving.leave()
            await leaving.stop(0)
            assert report.failed == 0
            assert report.sent == had
            await client.refresh()
            stayed = [n for n in nodes if n is not leaving]
            assert await held(stayed) == BLOCKS * replicas, "every copy is placed again"
            got = await client.get([key(i) for i in range(BLOCKS)])
            assert all(g is not None and bytes(g) == bytes(frame(i, 4096)) for i, g in enumerate(got))
        finally:
            nodes.remove(leaving)
            await client.aclose()
    assert await leftover_tasks() == []


async def test_a_leaving_node_refuses_writes_and_still_serves_reads() -> None:
    async with run_nodes(2) as (nodes, membership):
        client = PeerTier(StaticMembership(await membership.members()), suspect_s=60)
        await client.start()
        try:
            await client.put([(key(i), frame(i, 1024)) for i in range(50)])
            leaving = nodes[0]
            mine = [k for k in (key(i) for i in range(50)) if k in leaving.store]
            await leaving.leave()
            assert all(g is not None for g in await client.get(mine)), "reads still served"
            await client.put([(key(1000 + i), frame(1000 + i, 1024)) for i in range(50)])
            assert "n0" not in client.ring, "a refused write makes the client move on"
            assert all(await client.exists([key(1000 + i) for i in range(50)]))
        finally:
            await client.aclose()


async def test_after_a_join_reads_fall_back_to_the_previous_owner() -> None:
    async with run_nodes(3) as (nodes, membership):
        client = PeerTier(membership, read_fallback=1, timeout_s=10.0)
        await client.start()
        newcomer = None
        try:
            await client.put([(key(i), frame(i, 1024)) for i in range(BLOCKS)])
            newcomer = await start_node(membership, "late")
            await client.refresh()
            taken = [key(i) for i in range(BLOCKS) if client.ring.owner(key(i)) == "late"]
            assert 0 < len(taken) < BLOCKS
            assert all(g is not None for g in await client.get(taken))
        finally:
            if newcomer is not None:
                await newcomer.stop(0)
            await client.aclose()


# Real processes: `kvgate cache-node`, registered in Redis, stopped by signals.


def _spawn(tmp_path: Path, name: str, redis_url: str) -> tuple[subprocess.Popen[bytes], dict]:
    ready = tmp_path / f"{name}.json"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kvgate", "cache-node",
            "--port", "0", "--node-id", name, "--labels", f"host={name}",
            "--redis-url", redis_url, "--cluster", "t", "--ttl-s", "2", "--heartbeat-s", "0.3",
            "--capacity-bytes", "64M", "--ready-file", str(ready), "--log-level", "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node {name} did not start: {process.stdout.read() if process.stdout else ''}")
        time.sleep(0.05)
    return process, json.loads(ready.read_text())


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


async def test_sigterm_hands_off_every_block_before_exit(tmp_path: Path, redis_server: RedisServer) -> None:
    processes = [_spawn(tmp_path, f"p{i}", redis_server.url)[0] for i in range(3)]
    client = PeerTier(RedisMembership(redis_server.url, cluster="t"), read_fallback=0)
    try:
        await client.start()
        for _ in range(100):  # a busy machine may delay a heartbeat past a short TTL
            if len(client.ring) == 3:
                break
            await asyncio.sleep(0.1)
            await client.refresh()
        assert len(client.ring) == 3
        await client.put([(key(i), frame(i, 8192)) for i in range(BLOCKS)])
        usage = await client.usage()
        assert usage.blocks == BLOCKS

        os.kill(processes[0].pid, signal.SIGTERM)
        assert await asyncio.to_thread(processes[0].wait, 30) == 0
        output = processes[0].stdout.read().decode() if processes[0].stdout else ""
        assert "0 failed" in output, output

        await client.refresh()
        assert sorted(client.ring.nodes) == ["p1", "p2"]
        assert (await client.usage()).blocks == BLOCKS, "block count before == after"
        assert all(await client.exists([key(i) for i in range(BLOCKS)]))
    finally:
        await client.aclose()
        for process in processes:
            _stop(process)


async def test_a_killed_node_costs_only_its_share_and_expires(tmp_path: Path, redis_server: RedisServer) -> None:
    processes = [_spawn(tmp_path, f"k{i}", redis_server.url)[0] for i in range(3)]
    metrics = StoreMetrics(CollectorRegistry())
    client = PeerTier(RedisMembership(redis_server.url, cluster="t"), read_fallback=0, metrics=metrics)
    try:
        await client.start()
        await client.put([(key(i), frame(i, 8192)) for i in range(BLOCKS)])
        victim_share = [key(i) for i in range(BLOCKS) if client.ring.owner(key(i)) == "k0"]
        assert 0 < len(victim_share) < BLOCKS, "the victim must own some blocks, or the test proves nothing"
        os.kill(processes[0].pid, signal.SIGKILL)
        processes[0].wait(timeout=10)

        got = await client.get([key(i) for i in range(BLOCKS)])  # no exception
        missing = [key(i) for i, g in enumerate(got) if g is None]
        assert sorted(missing) == sorted(victim_share)
        assert "k0" not in client.ring, "the dead node is suspected at once"

        watcher = RedisMembership(redis_server.url, cluster="t")
        try:
            deadline = time.monotonic() + 10
            while "k0" in {n.node_id for n in await watcher.members()}:
                assert time.monotonic() < deadline, "registration did not expire"
                await asyncio.sleep(0.2)
        finally:
            await watcher.aclose()
    finally:
        await client.aclose()
        for process in processes:
            _stop(process)


async def test_a_client_built_from_the_proto_alone_interoperates() -> None:
    """The node's hand-encoded bulk messages are plain protobuf to any generated client."""
    import grpc.aio

    from kvcache._pb import kvcache_pb2 as pb
    from kvcache._pb import kvcache_pb2_grpc as pb_grpc

    async with run_nodes(1) as (nodes, _):
        async with grpc.aio.insecure_channel(nodes[0].info.address) as channel:
            stub = pb_grpc.KVCacheStub(channel)
            reply = await stub.Put(pb.PutRequest(blocks=[pb.Block(key=key(1), frame=bytes(frame(1)))]))
            assert reply.stored == 1
            got = await stub.Get(pb.GetRequest(keys=[key(1), key(2)]))
            assert got.served == 2
            assert list(got.frames) == [bytes(frame(1)), b""]
            assert list((await stub.Exists(pb.KeysRequest(keys=[key(1), key(2)]))).present) == [True, False]
