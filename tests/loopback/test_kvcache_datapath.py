"""The framed data port of a cache node keeps every promise the gRPC path keeps.

Real nodes on 127.0.0.1 port 0. The L2 tier and `NodeClient` move frames over
the data port; raw TCP clients written against proto/README.md send what a
hostile or broken caller would: a wrong token, a frame claiming 2^40 bytes, a
frame cut short by a dropped connection, a stall mid-frame. A raw TCP server
plays a hostile node the other way round.
"""

from __future__ import annotations

import asyncio
import struct
import time
import tracemalloc
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from kvcache.client import NodeClient
from kvcache.datapath.client import DataClient
from kvcache.datapath.protocol import (
    HEADER_SIZE,
    MessageType,
    Status,
    encode_get,
    encode_put_head,
    header,
    parse_header,
)
from kvcache.errors import TierRejected, TierUnavailable
from kvcache.membership import StaticMembership
from kvcache.metrics import StoreMetrics
from kvcache.server import CacheNode
from kvcache.tiers import PeerTier
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import leftover_tasks, run_nodes

MiB = 1 << 20
TOKEN = "cluster-token-0123456789abcdef"
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"


def node_count(node: CacheNode, name: str, **labels: str) -> float:
    return node.metrics.store.registry.get_sample_value(f"kvgate_kvcache_node_{name}", labels) or 0.0


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class RawClient:
    """A data-port client that sends whatever bytes a test gives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, node: CacheNode, token: str = TOKEN) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.data_port)
        client = cls(reader, writer)
        writer.write(header(MessageType.HELLO, len(token)) + token.encode())
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> tuple[int, bytes]:
        kind, length = parse_header(await asyncio.wait_for(self.reader.readexactly(HEADER_SIZE), 20))
        return kind, await asyncio.wait_for(self.reader.readexactly(length), 20)

    async def welcomed(self) -> None:
        kind, _ = await self.reply()
        assert kind == MessageType.WELCOME

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 20) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_large_blocks_round_trip_over_the_data_port_not_grpc() -> None:
    async with run_nodes(2, capacity_bytes=256 * MiB, cluster_token=TOKEN) as (nodes, membership):
        tier = PeerTier(StaticMembership(await membership.members()), token=TOKEN, read_fallback=0, timeout_s=20)
        await tier.start()
        try:
            sizes = [4 * MiB, 17 * MiB, 300 << 10, 70 * MiB]  # the last one is above a gRPC message
            items = [(key(i), frame(i, size)) for i, size in enumerate(sizes)]
            await tier.put(items)
            got = await tier.get([k for k, _ in items] + [key(99)])
            assert [bytes(g) if g is not None else None for g in got] == [bytes(f) for _, f in items] + [None]
            served = {m: sum(node_count(n, "requests_total", method=m) for n in nodes) for m in ("DataPut", "DataGet", "Put", "Get", "PutStream", "GetStream")}
            assert served["DataPut"] >= 1 and served["DataGet"] >= 1
            assert served["Put"] == served["Get"] == served["PutStream"] == served["GetStream"] == 0
        finally:
            await tier.aclose()
    assert await leftover_tasks() == []


async def test_a_node_without_a_data_port_is_spoken_to_over_grpc() -> None:
    async with run_nodes(1, data_plane=False) as (nodes, membership):
        assert nodes[0].data_port == 0
        tier = PeerTier(StaticMembership(await membership.members()), read_fallback=0, timeout_s=20)
        await tier.start()
        try:
            await tier.put([(key(1), frame(1, MiB))])
            assert [bytes(g) for g in await tier.get([key(1)]) if g is not None] == [bytes(frame(1, MiB))]
            assert node_count(nodes[0], "requests_total", method="Put") == 1
            assert node_count(nodes[0], "requests_total", method="DataPut") == 0
        finally:
            await tier.aclose()


async def test_a_frame_damaged_on_the_node_is_a_counted_miss_on_get() -> None:
    metrics = StoreMetrics(CollectorRegistry())
    async with run_nodes(1) as (nodes, membership):
        tier = PeerTier(StaticMembership(await membership.members()), read_fallback=0, metrics=metrics, timeout_s=20)
        await tier.start()
        try:
            await tier.put([(key(1), frame(1, MiB)), (key(2), frame(2, MiB))])
            damaged = bytearray(frame(1, MiB))
            damaged[-1] ^= 0xFF
            nodes[0].store.put_frame(key(1), damaged)
            got = await tier.get([key(1), key(2)])
            assert got[0] is None and got[1] is not None
            failures = metrics.registry.get_sample_value(
                "kvgate_kvcache_checksum_failures_total", {"tier": "l2", "reason": "checksum"}
            )
            assert failures == 1
            assert node_count(nodes[0], "requests_total", method="DataGet") == 1
        finally:
            await tier.aclose()


async def test_a_message_that_is_not_the_protocol_is_refused_and_the_connection_closed() -> None:
    async with run_nodes(1, cluster_token=TOKEN) as (nodes, _):
        client = await RawClient.open(nodes[0])
        await client.welcomed()
        bad = bytearray(encode_get([bytes(key(1))]))
        bad[0:4] = b"XXXX"
        await client.send(bytes(bad))
        kind, body = await client.reply()
        assert kind == MessageType.ERROR and body[0] == Status.INVALID_ARGUMENT
        assert await client.closed()
        await client.close()
        assert node_count(nodes[0], "rejected_requests_total", method="Data", reason="wire") == 1


async def test_a_frame_cut_short_by_a_dropped_connection_leaves_nothing_stored() -> None:
    async with run_nodes(1, cluster_token=TOKEN) as (nodes, _):
        node = nodes[0]
        whole, cut = frame(1, 64 << 10), frame(2, 4 * MiB)
        client = await RawClient.open(node)
        await client.welcomed()
        await client.send(encode_put_head([(bytes(key(1)), len(whole)), (bytes(key(2)), len(cut))]))
        await client.send(bytes(whole) + bytes(cut[: len(cut) // 2]))
        await wait_for(lambda: node.uploads.used_bytes == len(cut))  # the second frame is being received
        await client.close()
        await wait_for(lambda: node.uploads.used_bytes == 0)
        assert key(2) not in node.store
        assert key(1) in node.store  # the frame completed before the drop is whole, so kept


async def test_a_stalled_upload_is_cut_and_its_reservation_freed() -> None:
    async with run_nodes(1, upload_idle_timeout_s=0.3) as (nodes, _):
        node = nodes[0]
        cut = frame(2, 2 * MiB)
        client = await RawClient.open(node, token="")
        await client.welcomed()
        await client.send(encode_put_head([(bytes(key(2)), len(cut))]) + bytes(cut[:1000]))
        assert await client.closed()
        await client.close()
        assert node.uploads.used_bytes == 0 and key(2) not in node.store
        assert node_count(node, "rejected_requests_total", method="Data", reason="idle") == 1


@pytest.mark.parametrize("token", [pytest.param("", id="none"), pytest.param("wrong-token-0123456789abcdef", id="wrong")])
async def test_a_caller_without_a_known_token_is_refused_before_anything_is_read(token: str) -> None:
    async with run_nodes(1, cluster_token=TOKEN) as (nodes, _):
        client = await RawClient.open(nodes[0], token=token)
        await client.send(encode_put_head([(bytes(key(1)), 1 << 30)]))
        kind, body = await client.reply()
        assert kind == MessageType.ERROR and body[0] == Status.UNAUTHENTICATED
        assert await client.closed()
        await client.close()
        assert nodes[0].uploads.used_bytes == 0 and len(nodes[0].store) == 0
        assert node_count(nodes[0], "rejected_requests_total", method="Data", reason="unauthenticated") == 1
        # The data client with that token finds the node unusable (retryable elsewhere), as over gRPC.
        data = DataClient("127.0.0.1", nodes[0].data_port, token=token, timeout_s=10, max_block_bytes=MiB,
                          bytes_per_deadline=MiB)
        with pytest.raises(TierUnavailable, match="UNAUTHENTICATED"):
            await data.get([bytes(key(1))])
        await data.aclose()


async def test_tenants_do_not_reach_each_other_over_the_data_port() -> None:
    async with run_nodes(1, cluster_token=TOKEN, tenant_tokens=(("alice", ALICE), ("bob", BOB))) as (nodes, _):
        address = nodes[0].info.address
        alice, bob = NodeClient(address, token=ALICE, timeout_s=10), NodeClient(address, token=BOB, timeout_s=10)
        try:
            assert (await alice.put([(key(1), frame(1, MiB))])).stored == 1
            assert await bob.get([key(1)]) == [None]
            assert await alice.get([key(1)]) != [None]
            assert node_count(nodes[0], "requests_total", method="DataGet") == 2
        finally:
            await alice.aclose()
            await bob.aclose()


async def test_a_frame_claiming_more_than_the_limit_is_refused_without_allocating_it() -> None:
    async with run_nodes(1, capacity_bytes=64 * MiB, max_block_bytes=8 * MiB) as (nodes, _):
        node = nodes[0]
        client = await RawClient.open(node, token="")
        await client.welcomed()
        tracemalloc.start()
        try:
            await client.send(encode_put_head([(bytes(key(1)), 1 << 40)]) + b"x" * 4096)
            kind, body = await client.reply()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert kind == MessageType.ERROR and body[0] == Status.INVALID_ARGUMENT
        assert peak < 4 * MiB, f"the node allocated {peak} bytes for a refused frame"
        assert await client.closed()
        await client.close()
        assert node_count(node, "rejected_requests_total", method="Data", reason="total") == 1


async def test_frames_beyond_the_upload_budget_are_refused_as_resource_exhausted() -> None:
    async with run_nodes(1, capacity_bytes=64 * MiB, upload_budget_bytes=4 * MiB) as (nodes, _):
        node = nodes[0]
        holder = await RawClient.open(node, token="")
        await holder.welcomed()
        await holder.send(encode_put_head([(bytes(key(1)), 3 * MiB)]) + b"x" * 100)  # holds 3 MiB
        await wait_for(lambda: node.uploads.used_bytes == 3 * MiB)
        other = await RawClient.open(node, token="")
        await other.welcomed()
        await other.send(encode_put_head([(bytes(key(2)), 2 * MiB)]))
        kind, body = await other.reply()
        assert kind == MessageType.ERROR and body[0] == Status.RESOURCE_EXHAUSTED
        for client in (holder, other):
            await client.close()
        await wait_for(lambda: node.uploads.used_bytes == 0)
        # The L2 client maps the refusal to TierRejected, as over gRPC.
        assert node_count(node, "rejected_requests_total", method="Data", reason="budget") == 1


async def test_a_leaving_node_refuses_writes_over_the_data_port_and_writes_go_elsewhere() -> None:
    async with run_nodes(2) as (nodes, membership):
        tier = PeerTier(StaticMembership(await membership.members()), read_fallback=0, timeout_s=10, suspect_s=60)
        await tier.start()
        try:
            await tier.put([(key(i), frame(i, 256 << 10)) for i in range(8)])  # connections to both are open
            nodes[0].leaving = True
            await tier.put([(key(i), frame(i, 256 << 10)) for i in range(8, 40)])
            assert all(key(i) not in nodes[0].store for i in range(8, 40))
            assert all(key(i) in nodes[1].store for i in range(8, 40))
            assert node_count(nodes[0], "rejected_requests_total", method="Data", reason="leaving") >= 1
        finally:
            await tier.aclose()


async def test_a_hostile_node_cannot_make_the_client_allocate_what_it_claims() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, length = parse_header(await reader.readexactly(HEADER_SIZE))
        await reader.readexactly(length)
        writer.write(header(MessageType.WELCOME, 8) + struct.pack("<Q", 1 << 62))
        kind, length = parse_header(await reader.readexactly(HEADER_SIZE))
        await reader.readexactly(length)
        writer.write(header(MessageType.FRAMES, 12 + (1 << 62)) + struct.pack("<IQ", 1, 1 << 62))
        await writer.drain()
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = DataClient("127.0.0.1", port, token="", timeout_s=10, max_block_bytes=64 * MiB, bytes_per_deadline=64 * MiB)
    tracemalloc.start()
    try:
        with pytest.raises(TierRejected):
            await client.get([bytes(key(1))])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert peak < 4 * MiB


class _Unreachable:
    """Stands in for a node's data listener whose port no longer answers (say, not published)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def stop(self) -> None:
        return None


async def test_a_data_port_that_stops_answering_costs_no_call_and_gRPC_carries_on() -> None:
    metrics = StoreMetrics(CollectorRegistry())
    async with run_nodes(1) as (nodes, membership):
        node = nodes[0]
        tier = PeerTier(StaticMembership(await membership.members()), read_fallback=0, timeout_s=10, metrics=metrics)
        await tier.start()
        try:
            await tier.put([(key(1), frame(1, MiB))])
            listener, port = node._data, node.data_port
            assert listener is not None
            await listener.stop()  # nothing listens there any more, but the node still names the port
            node._data = _Unreachable(port)  # type: ignore[assignment]
            await tier.put([(key(2), frame(2, MiB))])
            got = await tier.get([key(1), key(2)])
            assert [bytes(g) if g is not None else None for g in got] == [bytes(frame(1, MiB)), bytes(frame(2, MiB))]
            assert "n0" in tier.ring, "the node must not be suspected"
            assert node_count(node, "requests_total", method="Put") == 1
            assert node_count(node, "requests_total", method="Get") == 1
            failures = metrics.registry.get_sample_value(
                "kvgate_kvcache_tier_failures_total", {"tier": "l2", "op": "put", "error": "TierUnavailable"}
            )
            assert not failures
        finally:
            await tier.aclose()
