"""Only token holders reach a cache node's blocks, and tenants never reach each other's.

Real nodes on 127.0.0.1, real gRPC clients (raw stubs for the callers without
a valid token), a real TLS handshake with a certificate made in the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from kvcache._pb import kvcache_pb2 as pb
from kvcache._pb import kvcache_pb2_grpc as pb_grpc
from kvcache.client import NodeClient
from kvcache.errors import TierError, TierUnavailable
from kvcache.framing import encode
from kvcache.membership import StaticMembership
from kvcache.tiers import PeerTier
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import leftover_tasks, run_nodes
from tests.support.kvcache_tls import self_signed

CLUSTER = "cluster-token-0123456789abcdef"
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
TENANTS = (("alice", ALICE), ("bob", BOB))


async def _one_chunk() -> AsyncIterator[pb.Chunk]:
    yield pb.Chunk(key=bytes(key(1)), total=64 << 20, offset=0, data=b"x" * 1024)


async def _call_every_method(address: str, metadata: tuple[tuple[str, str], ...]) -> dict[str, grpc.StatusCode]:
    codes: dict[str, grpc.StatusCode] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.KVCacheStub(channel)
        calls = {
            "Exists": lambda: stub.Exists(pb.KeysRequest(keys=[bytes(key(1))]), metadata=metadata, timeout=10),
            "Get": lambda: stub.Get(pb.GetRequest(keys=[bytes(key(1))]), metadata=metadata, timeout=10),
            "Put": lambda: stub.Put(
                pb.PutRequest(blocks=[pb.Block(key=bytes(key(1)), frame=bytes(frame(1, 64)))]), metadata=metadata, timeout=10
            ),
            "PutStream": lambda: stub.PutStream(_one_chunk(), metadata=metadata, timeout=10),
            "Stats": lambda: stub.Stats(pb.StatsRequest(), metadata=metadata, timeout=10),
        }
        for name, call in calls.items():
            try:
                await call()
                codes[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                codes[name] = exc.code()
        try:
            async for _ in stub.GetStream(pb.GetRequest(keys=[bytes(key(1))]), metadata=metadata, timeout=10):
                pass
            codes["GetStream"] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            codes["GetStream"] = exc.code()
    return codes


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-token"),
        pytest.param((("authorization", "Bearer wrong-token-0123456789abcdef"),), id="wrong-token"),
        pytest.param((("authorization", f"Bearer {CLUSTER[:-1]}"),), id="token-prefix"),
        pytest.param((("authorization", CLUSTER + "x"),), id="token-longer"),
    ],
)
async def test_every_method_refuses_a_caller_without_a_valid_token(metadata: tuple[tuple[str, str], ...]) -> None:
    async with run_nodes(1, cluster_token=CLUSTER) as (nodes, _):
        node = nodes[0]
        codes = await _call_every_method(node.info.address, metadata)
        assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAUTHENTICATED)
        assert len(codes) == 6
        assert len(node.store) == 0 and node.uploads.used_bytes == 0
        refused = node.metrics.rejected.labels("Put", "unauthenticated")._value.get()
        assert refused == 1


async def test_the_right_token_is_served_and_an_open_node_serves_anyone() -> None:
    async with run_nodes(1, cluster_token=CLUSTER) as (nodes, _):
        client = NodeClient(nodes[0].info.address, token=CLUSTER)
        try:
            await client.put([(key(1), frame(1, 1024))])
            assert (await client.get([key(1)]))[0] == bytes(frame(1, 1024))
        finally:
            await client.aclose()
    async with run_nodes(1) as (nodes, _):
        codes = await _call_every_method(nodes[0].info.address, ())
        assert grpc.StatusCode.UNAUTHENTICATED not in codes.values()


async def test_a_tenant_can_neither_read_nor_overwrite_another_tenants_blocks() -> None:
    async with run_nodes(1, cluster_token=CLUSTER, tenant_tokens=TENANTS) as (nodes, _):
        address = nodes[0].info.address
        alice = NodeClient(address, token=ALICE)
        bob = NodeClient(address, token=BOB)
        cluster = NodeClient(address, token=CLUSTER)
        try:
            mine = frame(1, 4096)
            await alice.put([(key(1), mine)])
            assert await bob.exists([key(1)]) == [False]
            assert await bob.get([key(1)]) == [None]
            assert await cluster.get([key(1)]) == [None], "a tenant's blocks are not under the plain key"
            # Bob writes a frame with a valid checksum under the same key: Alice still reads hers.
            forged = encode(key(1), b"\x00" * 4096)
            await bob.put([(key(1), forged)])
            await bob.put_stream([(key(1), forged)])
            assert (await alice.get([key(1)]))[0] == bytes(mine)
            assert (await bob.get([key(1)]))[0] == bytes(forged)
            with pytest.raises(TierError):
                await alice.exists([b"short-key"])  # tenants name plain 32-byte block keys only
        finally:
            for client in (alice, bob, cluster):
                await client.aclose()


async def test_a_hand_off_keeps_each_tenants_blocks_its_own() -> None:
    async with run_nodes(3, cluster_token=CLUSTER, tenant_tokens=TENANTS) as (nodes, membership):
        alice = PeerTier(StaticMembership(await membership.members()), token=ALICE, read_fallback=0, timeout_s=10)
        bob = PeerTier(membership, token=BOB, read_fallback=0, timeout_s=10)
        await alice.start()
        await bob.start()
        try:
            keys = [key(i) for i in range(60)]
            await alice.put([(k, frame(i, 1024)) for i, k in enumerate(keys)])
            leaving = nodes[1]
            assert len(leaving.store) > 0
            report = await leaving.leave()
            await leaving.stop(0)
            assert report.failed == 0 and report.sent == report.blocks
            alice_after = PeerTier(membership, token=ALICE, read_fallback=0, timeout_s=10)
            await alice_after.start()
            try:
                got = await alice_after.get(keys)
                assert all(g is not None and bytes(g) == bytes(frame(i, 1024)) for i, g in enumerate(got))
            finally:
                await alice_after.aclose()
            await bob.refresh()
            assert await bob.get(keys) == [None] * len(keys)
        finally:
            nodes.remove(leaving)
            await alice.aclose()
            await bob.aclose()
    assert await leftover_tasks() == []


async def test_tls_serves_a_client_that_trusts_the_certificate_and_no_one_else(tmp_path: Path) -> None:
    cert, private = self_signed(tmp_path)
    other_ca, _ = self_signed(tmp_path, "other")
    async with run_nodes(1, cluster_token=CLUSTER, tls_cert_file=str(cert), tls_key_file=str(private)) as (nodes, _):
        address = nodes[0].info.address
        trusted = NodeClient(address, token=CLUSTER, tls_ca_file=str(cert), timeout_s=10)
        plain = NodeClient(address, token=CLUSTER, timeout_s=5)
        wrong_ca = NodeClient(address, token=CLUSTER, tls_ca_file=str(other_ca), timeout_s=5)
        try:
            await trusted.put([(key(1), frame(1, 1024))])
            assert (await trusted.get([key(1)]))[0] == bytes(frame(1, 1024))
            for client in (plain, wrong_ca):
                with pytest.raises(TierUnavailable):
                    await client.exists([key(1)])
        finally:
            for client in (trusted, plain, wrong_ca):
                await client.aclose()
