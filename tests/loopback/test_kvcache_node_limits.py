"""A hostile client cannot make a cache node allocate what it claims, nor a hostile node a client.

A real node on 127.0.0.1 and a raw gRPC client that lies in its chunks: a
``total`` far beyond the node's budget, partial frames that never finish,
chunks beyond their total. The node answers each lie with a clear status,
allocates at most its upload budget (traced with tracemalloc) and frees what a
broken stream held. The other way round, a real gRPC server that streams a
frame claiming 2^62 bytes gets a refusal from the client, not an allocation.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio
import pytest

from kvcache._pb import kvcache_pb2 as pb
from kvcache._pb import kvcache_pb2_grpc as pb_grpc
from kvcache.client import NodeClient
from kvcache.errors import TierRejected
from kvcache.server import CacheNode
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import run_nodes

CAPACITY = 8 << 20
MiB = 1 << 20


async def _chunks(chunks: Sequence[pb.Chunk], hold: asyncio.Event | None = None) -> AsyncIterator[pb.Chunk]:
    for chunk in chunks:
        yield chunk
    if hold is not None:
        await hold.wait()  # keep the stream open, the frame incomplete


async def _put_stream(address: str, chunks: Sequence[pb.Chunk]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await pb_grpc.KVCacheStub(channel).PutStream(_chunks(chunks), timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def _wait_for(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


K = bytes(key(1))
K2 = bytes(key(2))


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param([pb.Chunk(key=K, total=1 << 62, offset=0, data=b"x")], "INVALID_ARGUMENT", id="total-2^62"),
        pytest.param([pb.Chunk(key=K, total=512 * MiB, offset=0, data=b"x")], "INVALID_ARGUMENT", id="total-over-capacity"),
        pytest.param(
            [pb.Chunk(key=K, total=100, offset=0, data=b"x" * 10), pb.Chunk(key=K, total=100, offset=10, data=b"y" * 95)],
            "INVALID_ARGUMENT", id="chunk-beyond-total",
        ),
        pytest.param(
            [pb.Chunk(key=K, total=100, offset=0, data=b"x" * 10), pb.Chunk(key=K, total=100, offset=50, data=b"y")],
            "INVALID_ARGUMENT", id="offset-gap",
        ),
        pytest.param(
            [pb.Chunk(key=K, total=100, offset=0, data=b"x" * 10), pb.Chunk(key=K, total=200, offset=10, data=b"y")],
            "INVALID_ARGUMENT", id="total-changes",
        ),
        pytest.param(
            [pb.Chunk(key=K, total=100, offset=0, data=b"x" * 10), pb.Chunk(key=K2, total=100, offset=0, data=b"y")],
            "INVALID_ARGUMENT", id="interleaved-keys",
        ),
        pytest.param([pb.Chunk(key=K, total=100, offset=5, data=b"x")], "INVALID_ARGUMENT", id="first-offset-not-0"),
        pytest.param([pb.Chunk(key=K, total=4, offset=0, data=b"x" * 10)], "INVALID_ARGUMENT", id="data-longer-than-total"),
        pytest.param([pb.Chunk(key=b"k" * 4096, total=4, offset=0, data=b"abcd")], "INVALID_ARGUMENT", id="key-too-long"),
    ],
)
async def test_a_lying_chunk_gets_a_clear_status_and_frees_its_buffer(chunks: list[pb.Chunk], expected: str) -> None:
    async with run_nodes(1, capacity_bytes=CAPACITY) as (nodes, _):
        node = nodes[0]
        code = await asyncio.wait_for(_put_stream(node.info.address, chunks), 30)
        assert code.name == expected
        # The status can reach the client a moment before the handler has unwound.
        await _wait_for(lambda: node.uploads.used_bytes == 0)
        assert len(node.store) == 0


async def _held_upload(address: str, total: int, hold: asyncio.Event) -> grpc.StatusCode:
    chunks = [pb.Chunk(key=bytes(key(total)), total=total, offset=0, data=b"x" * 1024)]
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await pb_grpc.KVCacheStub(channel).PutStream(_chunks(chunks, hold), timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_partial_frames_never_hold_more_than_the_budget_and_are_freed_when_streams_break() -> None:
    tracemalloc.start()
    try:
        async with run_nodes(1, capacity_bytes=CAPACITY) as (nodes, _):
            node = nodes[0]
            address = node.info.address
            hold, hold_refused = asyncio.Event(), asyncio.Event()
            # Three partial frames of 6 MiB each on a node whose budget is 8 MiB.
            first = asyncio.create_task(_held_upload(address, 6 * MiB, hold))
            await _wait_for(lambda: node.uploads.used_bytes == 6 * MiB)
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            others = await asyncio.wait_for(
                asyncio.gather(
                    _held_upload(address, 6 * MiB + 1, hold_refused), _held_upload(address, 6 * MiB + 2, hold_refused)
                ),
                30,
            )
            hold_refused.set()  # let the refused calls' request streams end
            assert [code.name for code in others] == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
            _, peak = tracemalloc.get_traced_memory()
            assert peak - before < 2 * MiB, f"refused uploads allocated {peak - before} bytes"
            assert node.uploads.used_bytes == 6 * MiB
            first.cancel()  # the client goes away mid-frame
            await asyncio.gather(first, return_exceptions=True)
            await _wait_for(lambda: node.uploads.used_bytes == 0)
            assert len(node.store) == 0
            hold.set()  # let the abandoned request stream end too
    finally:
        tracemalloc.stop()


async def test_a_frame_in_many_chunks_is_stored_and_a_truncated_one_is_not() -> None:
    async with run_nodes(1, capacity_bytes=CAPACITY) as (nodes, _):
        node = nodes[0]
        whole = bytes(frame(7, 3 * MiB))
        step = 64 << 10
        chunks = [pb.Chunk(key=bytes(key(7)), total=len(whole), offset=o, data=whole[o : o + step]) for o in range(0, len(whole), step)]
        assert (await _put_stream(node.info.address, chunks)).name == "OK"
        assert bytes(node.store.peek(key(7))) == whole
        assert (await _put_stream(node.info.address, [pb.Chunk(key=bytes(key(8)), total=len(whole), offset=0, data=whole[:step])])).name == "OK"
        assert key(8) not in node.store
        await _wait_for(lambda: node.uploads.used_bytes == 0)


async def test_a_get_of_too_many_keys_is_refused_and_the_client_splits_its_batches() -> None:
    async with run_nodes(1, capacity_bytes=CAPACITY) as (nodes, _):
        node: CacheNode = nodes[0]
        keys = [bytes(key(i)) for i in range(20_000)]
        async with grpc.aio.insecure_channel(node.info.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.KVCacheStub(channel).Exists(pb.KeysRequest(keys=keys), timeout=20)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client = NodeClient(node.info.address, timeout_s=20)
        try:
            assert await client.exists(keys) == [False] * len(keys)
            assert await client.get(keys) == [None] * len(keys)
        finally:
            await client.aclose()


async def _lying_node(total: int) -> tuple[grpc.aio.Server, str]:
    """A real gRPC server of the KVCache service that answers every Get with a streamed frame of `total` bytes."""

    async def get(request: pb.GetRequest, context: grpc.aio.ServicerContext) -> bytes:
        return b""  # served = 0: "too large for a message, stream it"

    async def get_stream(request: pb.GetRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        yield pb.Chunk(key=request.keys[0], total=total, offset=0, data=b"x" * 1024)

    service = pb.DESCRIPTOR.services_by_name["KVCache"].full_name
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service,
                {
                    "Get": grpc.unary_unary_rpc_method_handler(get, request_deserializer=pb.GetRequest.FromString),
                    "GetStream": grpc.unary_stream_rpc_method_handler(
                        get_stream,
                        request_deserializer=pb.GetRequest.FromString,
                        response_serializer=pb.Chunk.SerializeToString,
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("total", [pytest.param(1 << 62, id="2^62"), pytest.param(512 * MiB, id="512MiB")])
async def test_a_client_refuses_a_streamed_frame_larger_than_it_accepts(total: int) -> None:
    server, address = await _lying_node(total)
    client = NodeClient(address, timeout_s=10, max_block_bytes=64 * MiB)
    tracemalloc.start()
    try:
        with pytest.raises(TierRejected):
            await client.get([key(1)])
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 16 * MiB, f"the client allocated {peak} bytes for a lie"
    finally:
        tracemalloc.stop()
        await client.aclose()
        await server.stop(0)


async def test_a_stalled_upload_is_cut_and_its_reservation_freed() -> None:
    async with run_nodes(1, capacity_bytes=CAPACITY, upload_idle_timeout_s=0.5) as (nodes, _):
        node = nodes[0]
        hold = asyncio.Event()
        started = time.monotonic()
        code = await asyncio.wait_for(_held_upload(node.info.address, 6 * MiB, hold), 30)
        hold.set()
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 10
        await _wait_for(lambda: node.uploads.used_bytes == 0)
