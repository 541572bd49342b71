"""The KVCache gRPC service of a cache node: one handler per RPC of `proto/kvcache.proto`.

Each handler asks the node's `kvcache.auth.Authenticator` whom the call acts
for (the `AuthInterceptor` has already refused calls without a known token),
names stored keys through that caller (tenant scoping), checks every count
and size the caller sent before it decides an allocation (at most
`MAX_KEYS_PER_CALL` keys; streamed frames through `kvcache.uploads`), and
answers a request beyond the node's limits with INVALID_ARGUMENT, or
RESOURCE_EXHAUSTED when the upload budget is full.

Who uses it: `kvcache.server.CacheNode`, which owns the storage and the
settings. Not here: the node's life cycle, hand-off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from kvcache._pb import kvcache_pb2 as pb
from kvcache.auth import Caller
from kvcache.client import MAX_KEYS_PER_CALL, MIN_CHUNK_BYTES
from kvcache.datapath.protocol import VERSION as DATA_VERSION
from kvcache.errors import InvalidRequest, OverBudget, RequestRejected
from kvcache.framing import Buffer
from kvcache.keys import BlockKey
from kvcache.uploads import StreamAssembler
from kvcache.wire import WireError, decode_put_request, encode_get_response

if TYPE_CHECKING:
    from kvcache.server import CacheNode


class _Service:
    """The RPC handlers over a node's storage.

    `Put` and `Get` take and return raw bytes in protobuf wire format
    (`kvcache.wire`); the other methods use the generated classes. Every
    handler names stored keys through the caller's `Caller.stored_key`
    (tenant scoping) and refuses requests beyond the node's limits with
    INVALID_ARGUMENT or RESOURCE_EXHAUSTED.
    """

    def __init__(self, node: CacheNode) -> None:
        self._node = node

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        caller = self._node.auth.caller(context.invocation_metadata())
        # The interceptor let the call in, so the token is known.
        assert caller is not None
        return caller

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str, exc: RequestRejected) -> None:
        self._node.metrics.rejected.labels(method, exc.reason).inc()
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, OverBudget) else grpc.StatusCode.INVALID_ARGUMENT
        await context.abort(code, str(exc))

    def _stored_keys(self, caller: Caller, keys: Sequence[bytes]) -> list[BlockKey]:
        if len(keys) > MAX_KEYS_PER_CALL:
            raise InvalidRequest("keys", f"{len(keys)} keys in one call; at most {MAX_KEYS_PER_CALL}")
        return [BlockKey(caller.stored_key(key)) for key in keys]

    async def Exists(self, request: pb.KeysRequest, context: grpc.aio.ServicerContext) -> pb.ExistsResponse:
        self._node.metrics.requests.labels("Exists").inc()
        try:
            keys = self._stored_keys(self._caller(context), request.keys)
        except RequestRejected as exc:
            await self._refuse(context, "Exists", exc)
        store = self._node.store
        return pb.ExistsResponse(present=[key in store for key in keys])

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> bytes:
        node = self._node
        node.metrics.requests.labels("Get").inc()
        try:
            keys = self._stored_keys(self._caller(context), request.keys)
        except RequestRejected as exc:
            await self._refuse(context, "Get", exc)
        limit = node.batch_bytes
        if request.max_bytes:
            limit = min(limit, request.max_bytes)
        frames: list[Buffer | None] = []
        size = hits = 0
        for key in keys:
            frame = node.store.get_frame(key)
            length = 0 if frame is None else len(frame)
            if frames and size + length > limit or not frames and length > limit:
                break
            frames.append(frame)
            size += length
            hits += frame is not None
        node.metrics.blocks.labels("Get", "hit").inc(hits)
        node.metrics.blocks.labels("Get", "miss").inc(len(frames) - hits)
        return encode_get_response(frames, len(frames))

    async def Put(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        node = self._node
        node.metrics.requests.labels("Put").inc()
        if node.leaving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is leaving the ring")
        try:
            caller = self._caller(context)
            blocks = [(caller.stored_key(key), frame) for key, frame in decode_put_request(request)]
        except WireError as exc:
            node.metrics.rejected.labels("Put", "wire").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed PutRequest: {exc}")
        except RequestRejected as exc:
            await self._refuse(context, "Put", exc)
        stored = rejected = 0
        for key, frame in blocks:
            if len(frame) <= node.max_block_bytes and node.store.put_frame(BlockKey(key), frame):
                stored += 1
            else:
                rejected += 1
        node.metrics.blocks.labels("Put", "stored").inc(stored)
        node.metrics.blocks.labels("Put", "rejected").inc(rejected)
        return pb.PutResponse(stored=stored, rejected=rejected)

    async def GetStream(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        node = self._node
        node.metrics.requests.labels("GetStream").inc()
        try:
            keys = self._stored_keys(self._caller(context), request.keys)
        except RequestRejected as exc:
            await self._refuse(context, "GetStream", exc)
        chunk = max(MIN_CHUNK_BYTES, min(request.max_bytes or node.settings.chunk_bytes, node.batch_bytes))
        for asked, key in zip(request.keys, keys):
            frame = node.store.get_frame(key)
            if frame is None:
                yield pb.Chunk(key=asked, total=0)
                continue
            view = memoryview(frame)
            for offset in range(0, view.nbytes, chunk):
                yield pb.Chunk(key=asked, total=view.nbytes, offset=offset, data=bytes(view[offset : offset + chunk]))

    async def PutStream(
        self, request_iterator: AsyncIterator[pb.Chunk], context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        node = self._node
        node.metrics.requests.labels("PutStream").inc()
        if node.leaving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is leaving the ring")
        caller = self._caller(context)
        stored = rejected = 0
        assembler = StreamAssembler(node.uploads, node.max_block_bytes)
        chunks = aiter(request_iterator)
        try:
            while True:
                try:
                    async with asyncio.timeout(node.settings.upload_idle_timeout_s):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    node.metrics.rejected.labels("PutStream", "idle").inc()
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no chunk for {node.settings.upload_idle_timeout_s}s",
                    )
                try:
                    done = assembler.add(caller.stored_key(chunk.key), chunk.total, chunk.offset, chunk.data)
                except RequestRejected as exc:
                    await self._refuse(context, "PutStream", exc)
                node.metrics.pending_upload_bytes.set(node.uploads.used_bytes)
                if done is None:
                    continue
                key, frame = done
                if node.store.put_frame(BlockKey(key), frame):
                    stored += 1
                else:
                    rejected += 1
        finally:
            rejected += assembler.close()
            node.metrics.pending_upload_bytes.set(node.uploads.used_bytes)
        node.metrics.blocks.labels("PutStream", "stored").inc(stored)
        node.metrics.blocks.labels("PutStream", "rejected").inc(rejected)
        return pb.PutResponse(stored=stored, rejected=rejected)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        node = self._node
        return pb.StatsResponse(
            node_id=node.info.node_id,
            blocks=len(node.store),
            bytes_used=node.store.used_bytes,
            capacity_bytes=node.store.capacity_bytes,
        )


    async def DataPath(self, request: pb.DataPathRequest, context: grpc.aio.ServicerContext) -> pb.DataPathResponse:
        node = self._node
        return pb.DataPathResponse(
            port=node.data_port, version=DATA_VERSION if node.data_port else 0, max_block_bytes=node.max_block_bytes
        )


def service_handlers(node: CacheNode) -> grpc.GenericRpcHandler:
    """The KVCache service of `node`: raw wire bytes for Put and Get, generated classes otherwise."""
    service = _Service(node)
    name = pb.DESCRIPTOR.services_by_name["KVCache"].full_name
    return grpc.method_handlers_generic_handler(
        name,
        {
            "Exists": grpc.unary_unary_rpc_method_handler(
                service.Exists,
                request_deserializer=pb.KeysRequest.FromString,
                response_serializer=pb.ExistsResponse.SerializeToString,
            ),
            "Get": grpc.unary_unary_rpc_method_handler(
                service.Get, request_deserializer=pb.GetRequest.FromString, response_serializer=None
            ),
            "Put": grpc.unary_unary_rpc_method_handler(
                service.Put, request_deserializer=None, response_serializer=pb.PutResponse.SerializeToString
            ),
            "GetStream": grpc.unary_stream_rpc_method_handler(
                service.GetStream,
                request_deserializer=pb.GetRequest.FromString,
                response_serializer=pb.Chunk.SerializeToString,
            ),
            "PutStream": grpc.stream_unary_rpc_method_handler(
                service.PutStream,
                request_deserializer=pb.Chunk.FromString,
                response_serializer=pb.PutResponse.SerializeToString,
            ),
            "Stats": grpc.unary_unary_rpc_method_handler(
                service.Stats,
                request_deserializer=pb.StatsRequest.FromString,
                response_serializer=pb.StatsResponse.SerializeToString,
            ),
            "DataPath": grpc.unary_unary_rpc_method_handler(
                service.DataPath,
                request_deserializer=pb.DataPathRequest.FromString,
                response_serializer=pb.DataPathResponse.SerializeToString,
            ),
        },
    )
