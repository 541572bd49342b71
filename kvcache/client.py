"""A gRPC client of one L2 cache node.

Used by the L2 tier (`kvcache.tiers.peer`), which spreads keys over many nodes,
and by a leaving node (`kvcache.server`) handing its blocks to their new
owners. It speaks `proto/kvcache.proto` (the bulk messages encoded by `kvcache.wire`)
and hides its message-size rules:
batches are split to stay under the limit, `Get` is asked again for what a
response could not hold, and frames larger than a message travel through the
streams in chunks.

Frames are returned unchecked; checking is the caller's duty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from kvcache._pb import kvcache_pb2 as pb
from kvcache._pb import kvcache_pb2_grpc as pb_grpc
from kvcache.errors import TierError, TierRejected, TierTimeout, TierUnavailable
from kvcache.framing import Buffer
from kvcache.keys import BlockKey
from kvcache.wire import WireError, decode_get_response, encode_put_request

#: Default cap on one gRPC message, both directions.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
#: Room left in a message for field tags and lengths.
_ENVELOPE = 64 << 10
#: Chunk size of streamed frames.
DEFAULT_CHUNK_BYTES = 4 << 20


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel/server options shared by clients and nodes."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A restarted node should be found again within seconds.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),
    ]


@dataclass(frozen=True, slots=True)
class PutResult:
    """Outcome of a batched put: blocks stored and blocks refused."""

    stored: int
    rejected: int


def rpc_error(tier: str, address: str, exc: grpc.aio.AioRpcError) -> TierError:
    """Translate a gRPC failure into the kvcache error hierarchy."""
    code = exc.code()
    message = f"{address}: {code.name} {exc.details()}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TierTimeout(tier, message)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return TierRejected(tier, message)
    return TierUnavailable(tier, message)


class NodeClient:
    """Calls one cache node.

    Args:
        address: ``host:port``.
        timeout_s: deadline of each RPC.
        max_message_bytes: message cap; must not exceed the node's.
        chunk_bytes: chunk size when streaming frames.
        tier: label used in errors.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        tier: str = "l2",
    ) -> None:
        self.address = address
        self._timeout = timeout_s
        self._limit = max_message_bytes
        self._batch_bytes = max(1, max_message_bytes - _ENVELOPE)
        self._chunk = min(chunk_bytes, self._batch_bytes)
        self._tier = tier
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.KVCacheStub(self._channel)
        # The bulk methods carry raw wire bytes (kvcache.wire), not generated messages.
        service = pb.DESCRIPTOR.services_by_name["KVCache"].full_name
        self._put_raw = self._channel.unary_unary(
            f"/{service}/Put", request_serializer=None, response_deserializer=pb.PutResponse.FromString
        )
        self._get_raw = self._channel.unary_unary(
            f"/{service}/Get", request_serializer=pb.GetRequest.SerializeToString, response_deserializer=None
        )

    def _error(self, exc: grpc.aio.AioRpcError) -> TierError:
        return rpc_error(self._tier, self.address, exc)

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether the node holds each key.

        Raises:
            TierError: the node did not answer.
        """
        try:
            reply = await self._stub.Exists(pb.KeysRequest(keys=keys), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return list(reply.present)

    async def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        """The stored frame of each key, or None.

        Raises:
            TierError: the node did not answer.
        """
        frames: list[bytes | None] = []
        try:
            while len(frames) < len(keys):
                rest = keys[len(frames) :]
                raw = await self._get_raw(pb.GetRequest(keys=rest, max_bytes=self._batch_bytes), timeout=self._timeout)
                got, served = decode_get_response(raw)
                if served == 0:
                    # The next frame alone is larger than a message: stream it.
                    frames.extend(await self._get_streamed(rest[:1]))
                    continue
                frames.extend(got[:served])
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        except WireError as exc:
            raise TierRejected(self._tier, f"{self.address}: malformed GetResponse: {exc}") from exc
        return frames

    async def _get_streamed(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        found: dict[bytes, bytearray] = {}
        call = self._stub.GetStream(pb.GetRequest(keys=keys, max_bytes=self._chunk), timeout=self._timeout)
        async for chunk in call:
            if chunk.total == 0:
                continue
            buffer = found.setdefault(chunk.key, bytearray(chunk.total))
            buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        return [bytes(found[key]) if key in found else None for key in keys]

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> PutResult:
        """Store frames, in as few messages as the size cap allows.

        Raises:
            TierError: the node did not take the writes.
        """
        stored = rejected = 0
        batch: list[tuple[BlockKey, Buffer]] = []
        size = 0
        try:
            for key, frame in items:
                length = memoryview(frame).nbytes
                if length > self._batch_bytes:
                    result = await self.put_stream([(key, frame)])
                    stored, rejected = stored + result.stored, rejected + result.rejected
                    continue
                if batch and size + length > self._batch_bytes:
                    reply = await self._put_raw(encode_put_request(batch), timeout=self._timeout)
                    stored, rejected = stored + reply.stored, rejected + reply.rejected
                    batch, size = [], 0
                batch.append((key, frame))
                size += length
            if batch:
                reply = await self._put_raw(encode_put_request(batch), timeout=self._timeout)
                stored, rejected = stored + reply.stored, rejected + reply.rejected
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return PutResult(stored, rejected)

    async def put_stream(self, items: Sequence[tuple[BlockKey, Buffer]], *, timeout_s: float | None = None) -> PutResult:
        """Store frames through the client stream, chunked (bulk moves, big frames).

        Args:
            items: keys and frames.
            timeout_s: deadline of the whole stream (default: the RPC timeout
                scaled by the number of chunks).

        Raises:
            TierError: the node did not take the writes.
        """
        chunk_size = self._chunk

        async def chunks() -> AsyncIterator[pb.Chunk]:
            for key, frame in items:
                view = memoryview(frame).cast("B")
                for offset in range(0, max(view.nbytes, 1), chunk_size):
                    yield pb.Chunk(
                        key=key, total=view.nbytes, offset=offset, data=bytes(view[offset : offset + chunk_size])
                    )

        total = sum(memoryview(frame).nbytes for _, frame in items)
        deadline = timeout_s if timeout_s is not None else self._timeout * (1 + total // chunk_size)
        try:
            reply = await self._stub.PutStream(chunks(), timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return PutResult(reply.stored, reply.rejected)

    async def stats(self) -> pb.StatsResponse:
        """The node's id and fill level.

        Raises:
            TierError: the node did not answer.
        """
        try:
            return await self._stub.Stats(pb.StatsRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def aclose(self) -> None:
        """Close the channel."""
        await self._channel.close()
