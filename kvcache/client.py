"""A gRPC client of one L2 cache node.

Used by the L2 tier (`kvcache.tiers.peer`), which spreads keys over many nodes,
and by a leaving node (`kvcache.server`) handing its blocks to their new
owners. It speaks `proto/kvcache.proto` (the bulk messages encoded by `kvcache.wire`)
and hides its message-size rules:
batches are split to stay under the limit, `Get` is asked again for what a
response could not hold, and frames larger than a message travel through the
streams in chunks.

Puts and gets go over the node's framed data port instead
(`kvcache.datapath`) when the node names one (the ``DataPath`` call, asked
once) and the channel is not TLS: same answers, same errors, a fraction of
the copies. A node that serves none, or predates the call, is spoken to over
gRPC alone. When the data port fails (unreachable, reset), the call is made
again over gRPC, which fails in turn if the node is gone, and the node is
spoken to over gRPC for the next `DATA_PORT_RETRY_S` before its data port is
asked for again.

Every call carries the caller's token (`kvcache.auth`); with a CA file the
channel is TLS. A node's answers are bounded like a caller's requests: a
streamed frame larger than `max_block_bytes`, or chunks that do not add up,
are refused (`TierRejected`) before anything is allocated for them.

Frames are returned unchecked unless `get` is given a check; checking is the
caller's duty (the L2 tier checks each frame as it arrives).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from kvcache._pb import kvcache_pb2 as pb
from kvcache._pb import kvcache_pb2_grpc as pb_grpc
from kvcache.auth import call_metadata
from kvcache.datapath.client import DataClient, FrameCheck
from kvcache.datapath.protocol import VERSION as DATA_VERSION
from kvcache.errors import ConfigError, TierError, TierRejected, TierTimeout, TierUnavailable
from kvcache.framing import Buffer
from kvcache.keys import BlockKey
from kvcache.wire import WireError, decode_get_response, encode_put_request

log = logging.getLogger(__name__)

#: Default cap on one gRPC message, both directions.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
#: Room left in a message for field tags and lengths.
_ENVELOPE = 64 << 10
#: Chunk size of streamed frames.
DEFAULT_CHUNK_BYTES = 4 << 20
#: Smallest chunk a node streams, whatever the caller asks.
MIN_CHUNK_BYTES = 64 << 10
#: Most keys in one call; nodes refuse more, the client splits its batches.
MAX_KEYS_PER_CALL = 4096
#: Largest frame a client reads from a stream (the nodes' default maximum).
DEFAULT_MAX_BLOCK_BYTES = 256 << 20
#: After a node's data port failed, how long its calls go over gRPC only.
DATA_PORT_RETRY_S = 30.0


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
    # NOTE: a refused token fails every call to that node alike, so it counts
    # as the node being unusable (retryable elsewhere), not as one bad request.
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
        token: sent with every call (`kvcache.auth`); empty for an open node.
        tls_ca_file: PEM roots to verify the node's certificate with; empty
            for plain TCP.
        tls_server_name: name to check the certificate against, when it is
            not the host in `address`.
        max_block_bytes: largest frame accepted from a stream.
        data_plane: use the node's framed data port for puts and gets when
            it serves one (never over TLS).

    Raises:
        ConfigError: the CA file cannot be read.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        tier: str = "l2",
        token: str = "",
        tls_ca_file: str = "",
        tls_server_name: str = "",
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
        data_plane: bool = True,
    ) -> None:
        self.address = address
        self._token = token
        self._data_plane = data_plane and not tls_ca_file
        self._data: DataClient | None = None
        self._data_lock = asyncio.Lock()
        self._data_resume_at = 0.0
        self._timeout = timeout_s
        self._limit = max_message_bytes
        self._batch_bytes = max(1, max_message_bytes - _ENVELOPE)
        self._chunk = min(chunk_bytes, self._batch_bytes)
        self._tier = tier
        self._metadata = call_metadata(token)
        self._max_block = max_block_bytes
        options: list[tuple[str, int | str]] = list(channel_options(max_message_bytes))
        if tls_ca_file:
            try:
                roots = Path(tls_ca_file).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the TLS CA file: {exc}") from exc
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
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

    async def data_client(self) -> DataClient | None:
        """The node's data-port client, asking the node for its port the first time; None for gRPC only.

        Raises:
            TierError: the node did not answer the ``DataPath`` call.
        """
        if self._data is not None or not self._data_plane or time.monotonic() < self._data_resume_at:
            return self._data
        async with self._data_lock:  # concurrent first calls ask once and share one client
            if self._data is not None or not self._data_plane:
                return self._data
            return await self._discover_data()

    async def _discover_data(self) -> DataClient | None:
        try:
            reply = await self._stub.DataPath(pb.DataPathRequest(), timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._data_plane = False  # a node from before the data port
                return None
            raise self._error(exc) from exc
        if not reply.port or reply.version != DATA_VERSION:
            self._data_plane = False
            return None
        self._data = DataClient(
            self.address.rsplit(":", 1)[0],
            reply.port,
            token=self._token,
            timeout_s=self._timeout,
            max_block_bytes=self._max_block,
            bytes_per_deadline=self._limit,
            tier=self._tier,
            address=self.address,
        )
        return self._data

    async def _data_failed(self, exc: TierError) -> bool:
        """After a failed data-port call: whether to make the same call over gRPC.

        A refusal (`TierRejected`) stands. Otherwise the data port is left
        alone for `DATA_PORT_RETRY_S` (the node may have restarted on another
        port, or its data port may be unreachable from here while its gRPC
        port is not, as behind a port mapping that publishes only the latter)
        and, unless the node timed out, the call is made again over gRPC,
        which fails in turn if the node itself is gone.
        """
        if not exc.retryable:
            return False
        log.warning("%s: data port failed (%s); gRPC only for %.0f s", self.address, exc, DATA_PORT_RETRY_S)
        self._data_resume_at = time.monotonic() + DATA_PORT_RETRY_S
        if self._data is not None:
            data, self._data = self._data, None
            await data.aclose()
        return not isinstance(exc, TierTimeout)

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether the node holds each key.

        Raises:
            TierError: the node did not answer.
        """
        present: list[bool] = []
        try:
            for start in range(0, len(keys), MAX_KEYS_PER_CALL):
                batch = keys[start : start + MAX_KEYS_PER_CALL]
                reply = await self._stub.Exists(pb.KeysRequest(keys=batch), timeout=self._timeout, metadata=self._metadata)
                if len(reply.present) != len(batch):
                    raise TierRejected(self._tier, f"{self.address}: {len(reply.present)} answers for {len(batch)} keys")
                present.extend(reply.present)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return present

    async def get(self, keys: Sequence[BlockKey], *, check: FrameCheck | None = None) -> list[Buffer | None]:
        """The stored frame of each key, or None.

        Args:
            keys: the keys.
            check: called with each key and frame read; a frame it refuses
                is returned as None. Over the data port it runs as each
                frame arrives, while the frame is still in the CPU's cache.

        Raises:
            TierError: the node did not answer.
        """
        data = await self.data_client()
        if data is not None:
            try:
                return await data.get(keys, check=check)  # type: ignore[return-value]
            except TierError as exc:
                if not await self._data_failed(exc):
                    raise
        frames: list[bytes | None] = []
        try:
            while len(frames) < len(keys):
                rest = keys[len(frames) : len(frames) + MAX_KEYS_PER_CALL]
                raw = await self._get_raw(
                    pb.GetRequest(keys=rest, max_bytes=self._batch_bytes), timeout=self._timeout, metadata=self._metadata
                )
                got, served = decode_get_response(raw)
                if served > len(rest) or len(got) < served:
                    raise WireError(f"{served} served, {len(got)} frames, for {len(rest)} keys")
                if served == 0:
                    # The next frame alone is larger than a message: stream it.
                    frames.extend(await self._get_streamed(rest[:1]))
                    continue
                frames.extend(got[:served])
            if check is not None:
                frames = [None if f is None or not check(k, f) else f for k, f in zip(keys, frames)]
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        except WireError as exc:
            raise TierRejected(self._tier, f"{self.address}: malformed GetResponse: {exc}") from exc
        return frames

    async def _get_streamed(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        found: dict[bytes, bytearray] = {}
        call = self._stub.GetStream(
            pb.GetRequest(keys=keys, max_bytes=self._chunk), timeout=self._timeout, metadata=self._metadata
        )
        async for chunk in call:
            if chunk.total == 0:
                continue
            buffer = found.get(chunk.key)
            if buffer is None:
                if chunk.key not in keys or chunk.total > self._max_block:
                    call.cancel()
                    raise TierRejected(self._tier, f"{self.address}: streamed a frame of {chunk.total} bytes for an unasked or oversized key")
                buffer = found[chunk.key] = bytearray(chunk.total)
            if chunk.total != len(buffer) or chunk.offset + len(chunk.data) > len(buffer):
                call.cancel()
                raise TierRejected(self._tier, f"{self.address}: streamed chunks beyond their frame")
            buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        return [bytes(found[key]) if key in found else None for key in keys]

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> PutResult:
        """Store frames, in as few messages as the size cap allows.

        Raises:
            TierError: the node did not take the writes.
        """
        data = await self.data_client()
        if data is not None:
            try:
                return PutResult(*await data.put(items))
            except TierError as exc:
                if not await self._data_failed(exc):
                    raise
        stored = rejected = 0
        batch: list[tuple[BlockKey, Buffer]] = []
        size = 0
        try:
            for key, frame in items:
                length = memoryview(frame).nbytes
                if length > self._batch_bytes:
                    try:
                        result = await self.put_stream([(key, frame)])
                    except TierRejected:
                        rejected += 1  # this frame is over the node's limit; the rest of the batch goes on
                        continue
                    stored, rejected = stored + result.stored, rejected + result.rejected
                    continue
                if batch and size + length > self._batch_bytes:
                    reply = await self._put_raw(encode_put_request(batch), timeout=self._timeout, metadata=self._metadata)
                    stored, rejected = stored + reply.stored, rejected + reply.rejected
                    batch, size = [], 0
                batch.append((key, frame))
                size += length
            if batch:
                reply = await self._put_raw(encode_put_request(batch), timeout=self._timeout, metadata=self._metadata)
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
            reply = await self._stub.PutStream(chunks(), timeout=deadline, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return PutResult(reply.stored, reply.rejected)

    async def stats(self) -> pb.StatsResponse:
        """The node's id and fill level.

        Raises:
            TierError: the node did not answer.
        """
        try:
            return await self._stub.Stats(pb.StatsRequest(), timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def aclose(self) -> None:
        """Close the channel and the data connections."""
        if self._data is not None:
            await self._data.aclose()
        await self._channel.close()
