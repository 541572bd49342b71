"""A refusal of one block is not an outage; a stuck hand-off does not stop a node from stopping.

Real cache nodes on 127.0.0.1: one whose per-block maximum is below a frame
the store writes (a permanent refusal), and a hand-off target that accepts
TCP connections and never answers.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio

from prometheus_client import CollectorRegistry

from kvcache._pb import kvcache_pb2 as pb
from kvcache.membership import StaticMembership
from kvcache.metrics import StoreMetrics
from kvcache.ring import NodeInfo
from kvcache.store import TieredStore
from kvcache.tiers import LocalTier, PeerTier
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import leftover_tasks, run_nodes

MiB = 1 << 20


def sample(metrics: StoreMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"kvgate_kvcache_{name}", labels) or 0.0


async def test_a_block_a_node_refuses_is_dropped_and_counted_and_l2_stays_in_use() -> None:
    metrics = StoreMetrics(CollectorRegistry())
    async with run_nodes(1, max_message_bytes=1 * MiB, max_block_bytes=2 * MiB) as (nodes, membership):
        l2 = PeerTier(StaticMembership(await membership.members()), max_message_bytes=1 * MiB, metrics=metrics, suspect_s=60)
        store = TieredStore([LocalTier(64 * MiB, metrics=metrics), l2], metrics=metrics)
        await store.start()
        try:
            small = [(key(i), frame(i, 64 << 10)) for i in range(4)]
            huge = (key(99), frame(99, 3 * MiB))
            await store.put([*small[:2], huge, *small[2:]])
            await store.flush()
            assert store.is_up(l2), "one refused block must not take L2 down"
            assert "n0" in l2.ring, "nor make the node a suspect"
            assert all(k in nodes[0].store for k, _ in small)
            assert key(99) not in nodes[0].store
            assert sample(metrics, "dropped_writes_total", tier="l2", reason="rejected") == 1
            assert sample(metrics, "tier_failures_total", tier="l2", op="put", error="TierRejected") == 0
            # A refusal that is all a call got raises TierRejected: still no outage.
            await store.put([huge])
            await store.flush()
            assert store.is_up(l2)
            assert [f is not None for f in await l2.get([k for k, _ in small])] == [True] * 4
        finally:
            await store.aclose()
    assert await leftover_tasks() == []


async def _hung_node() -> tuple[grpc.aio.Server, int]:
    """A real gRPC server of the KVCache service whose PutStream never answers."""

    async def hang(request_iterator, context):  # type: ignore[no-untyped-def]
        await asyncio.Event().wait()

    service = pb.DESCRIPTOR.services_by_name["KVCache"].full_name
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {"PutStream": grpc.stream_unary_rpc_method_handler(hang)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_a_hand_off_that_times_out_is_bounded_and_the_node_still_stops() -> None:
    hung, port = await _hung_node()
    try:
        async with run_nodes(1, handoff_timeout_s=1.0) as (nodes, membership):
            node = nodes[0]
            for i in range(20):
                node.store.put_frame(key(i), frame(i, 1024))
            await membership.register(NodeInfo.make("hung", f"127.0.0.1:{port}", {"host": "hx"}))
            started = time.monotonic()
            report = await asyncio.wait_for(node.leave(), 30)
            elapsed = time.monotonic() - started
            assert report.timed_out
            assert report.failed == 20 and report.sent == 0
            assert elapsed < 10, f"leave took {elapsed:.1f}s with a 1 s deadline"
            await node.stop(0)
            assert node._server is None
    finally:
        await hung.stop(0)
