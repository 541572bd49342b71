"""The node side of the framed data protocol: a listener beside the gRPC server.

`DataListener` accepts TCP connections on the node's data port and serves
each on a task of its own: first a HELLO carrying a token, then PUT and GET
messages in turn (proto/README.md). It keeps every promise the gRPC
handlers (`kvcache.service`) keep:

- Authentication before anything else: until a HELLO with a token the
  node's `Authenticator` knows, a connection can make the node read at most
  one header and `MAX_HELLO_BYTES`; a wrong token gets UNAUTHENTICATED and the
  connection is closed. Every key is then named through the connection's
  `Caller` (tenant scoping).
- Limits before allocation: counts, key sizes and each frame's length are
  checked from the PUT directory before any frame is read; a frame above the
  node's per-block maximum fails the call (INVALID_ARGUMENT) unallocated; a
  frame's buffer is allocated only after its bytes are reserved in the
  node's `UploadBudget` (RESOURCE_EXHAUSTED when they do not fit), and the
  reservation is released when the frame is stored or the connection breaks.
- No half-written block: a frame is stored only once it is whole; a dropped
  connection leaves the blocks it completed, never a part of one. As over
  gRPC, frames are stored as they came: readers check each
  (`kvcache.framing.open_frame`) before it is used, so a frame damaged on
  the way in is a counted miss when read, never a block handed to an engine.
- Timeouts: a connection whose bytes stop coming mid-message for
  `upload_idle_timeout_s`, or that idles between messages for
  `idle_timeout_s`, is closed (and its reservation freed); so is one whose
  reader takes no byte of an answer for `upload_idle_timeout_s`.
- While the node is leaving, PUT is refused with UNAVAILABLE; GET is served.

After an ERROR the listener closes the connection: a refused body is never
read, so the stream cannot be resynchronised.

Who uses it: `kvcache.server.CacheNode`. Not here: the message layout
(`kvcache.datapath.protocol`), TLS (a node serving TLS offers no data port;
its clients keep to gRPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

from kvcache.auth import AUTH_METADATA_KEY, Caller
from kvcache.datapath.protocol import (
    HEADER_SIZE,
    MAX_GET_BYTES,
    MAX_HELLO_BYTES,
    MessageType,
    PeerClosed,
    ProtocolError,
    Status,
    encode_error,
    encode_frames_head,
    encode_stored,
    encode_u64,
    header,
    parse_directory,
    parse_get,
    parse_header,
    parse_put_head,
    recv_exact,
    recv_into,
    send_all,
    tune,
)
from kvcache.errors import InvalidRequest, OverBudget, RequestRejected
from kvcache.framing import Buffer
from kvcache.keys import BlockKey

if TYPE_CHECKING:
    from kvcache.server import CacheNode

log = logging.getLogger(__name__)

#: Longest a refused connection is kept open for its caller to read the ERROR.
LINGER_S = 1.0
#: Most bytes discarded meanwhile.
LINGER_BYTES = 16 << 20


class _Refused(Exception):
    """A request the listener answers with an ERROR, then closes the connection."""

    def __init__(self, status: Status, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _refusal(exc: RequestRejected) -> _Refused:
    status = Status.RESOURCE_EXHAUSTED if isinstance(exc, OverBudget) else Status.INVALID_ARGUMENT
    return _Refused(status, exc.reason, str(exc))


class DataListener:
    """Serves a node's data port.

    Args:
        node: the node whose store, limits, tokens and metrics it uses.
        idle_timeout_s: longest wait for the next message on an open
            connection before closing it.
    """

    def __init__(self, node: CacheNode, *, idle_timeout_s: float = 300.0) -> None:
        self._node = node
        self._idle = idle_timeout_s
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._connections: dict[asyncio.Task[None], socket.socket] = {}

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        if self._sock is None:
            raise RuntimeError("data listener not started")
        return self._sock.getsockname()[1]

    async def start(self, host: str, port: int) -> int:
        """Bind and start accepting.

        Returns:
            The port bound (`port`, or a free one for 0).
        """
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        sock.setblocking(False)
        self._sock = sock
        self._acceptor = asyncio.create_task(self._accept_forever(), name="kvcache-data-accept")
        return self.port

    async def stop(self) -> None:
        """Stop accepting and close every connection (what is mid-frame is dropped)."""
        tasks = [task for task in (self._acceptor, *self._connections) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A task cancelled before it ran never reached its own close.
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()
        self._acceptor = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        limit = self._node.settings.max_concurrent_rpcs
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            if len(self._connections) >= limit:
                self._node.metrics.rejected.labels("Data", "connections").inc()
                conn.close()
                continue
            tune(conn)
            task = asyncio.create_task(self._serve(conn), name="kvcache-data-conn")
            self._connections[task] = conn
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            caller = await self._hello(loop, conn)
            while True:
                async with asyncio.timeout(self._idle):
                    head = await loop.sock_recv(conn, HEADER_SIZE)
                if not head:
                    return  # the client closed between messages
                if len(head) < HEADER_SIZE:
                    head += await self._read(loop, conn, HEADER_SIZE - len(head))
                kind, length = parse_header(head)
                if kind == MessageType.PUT:
                    await self._put(loop, conn, caller, length)
                elif kind == MessageType.GET:
                    await self._get(loop, conn, caller, length)
                else:
                    raise ProtocolError(f"unexpected message type {kind:#x}")
        except _Refused as exc:
            self._node.metrics.rejected.labels("Data", exc.reason).inc()
            await self._refuse(loop, conn, encode_error(exc.status, str(exc)))
        except ProtocolError as exc:
            self._node.metrics.rejected.labels("Data", "wire").inc()
            await self._refuse(loop, conn, encode_error(Status.INVALID_ARGUMENT, str(exc)))
        except TimeoutError:
            self._node.metrics.rejected.labels("Data", "idle").inc()
        except (PeerClosed, OSError) as exc:
            log.debug("data connection dropped: %s", exc)
        finally:
            conn.close()

    async def _refuse(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, error: bytes) -> None:
        """Send an ERROR, then let the caller read it before the connection closes.

        Closing a socket with unread bytes in it resets the connection, and a
        reset can overtake the ERROR on its way to the caller. So the node
        ends its side of the stream and discards what still arrives, for at
        most `LINGER_S` and `LINGER_BYTES` (the caller is expected to stop
        sending and close once it reads the ERROR).
        """
        with contextlib.suppress(OSError, TimeoutError, PeerClosed):
            async with asyncio.timeout(LINGER_S):
                await send_all(loop, conn, [error])
                conn.shutdown(socket.SHUT_WR)
                scratch = bytearray(1 << 16)
                discarded = 0
                while discarded < LINGER_BYTES:
                    count = await loop.sock_recv_into(conn, scratch)
                    if not count:
                        break
                    discarded += count

    async def _read(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int) -> bytearray:
        return await recv_exact(loop, conn, size, idle_s=self._node.settings.upload_idle_timeout_s)

    async def _hello(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> Caller:
        node = self._node
        kind, length = parse_header(await self._read(loop, conn, HEADER_SIZE))
        if kind != MessageType.HELLO or length > MAX_HELLO_BYTES:
            raise ProtocolError("a connection starts with a HELLO of at most 512 bytes")
        token = bytes(await self._read(loop, conn, length)).decode(errors="replace")
        caller = node.auth.caller(((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ())
        if caller is None:
            raise _Refused(Status.UNAUTHENTICATED, "unauthenticated", "missing or unknown token")
        welcome = encode_u64(node.max_block_bytes)
        await send_all(
            loop, conn, [header(MessageType.WELCOME, len(welcome)) + welcome], idle_s=node.settings.upload_idle_timeout_s
        )
        return caller

    async def _put(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, caller: Caller, length: int) -> None:
        node = self._node
        node.metrics.requests.labels("DataPut").inc()
        count, size = parse_put_head(await self._read(loop, conn, 8))
        entries = parse_directory(await self._read(loop, conn, size), count)
        if 8 + size + sum(frame_length for _, frame_length in entries) != length:
            raise ProtocolError("PUT body length does not match its directory")
        try:
            stored_keys = [caller.stored_key(key) for key, _ in entries]
        except RequestRejected as exc:
            raise _refusal(exc) from exc
        for _, frame_length in entries:
            if frame_length > node.max_block_bytes:
                raise _refusal(InvalidRequest(
                    "total", f"a frame of {frame_length} bytes exceeds the node's {node.max_block_bytes}-byte maximum"
                ))
        if node.leaving:
            raise _Refused(Status.UNAVAILABLE, "leaving", "node is leaving the ring")
        stored = rejected = 0
        for (_key, frame_length), stored_key in zip(entries, stored_keys):
            frame = await self._receive_frame(loop, conn, frame_length)
            if node.store.put_frame(BlockKey(stored_key), frame):
                stored += 1
            else:
                rejected += 1
        node.metrics.blocks.labels("DataPut", "stored").inc(stored)
        node.metrics.blocks.labels("DataPut", "rejected").inc(rejected)
        await send_all(loop, conn, [encode_stored(stored, rejected)], idle_s=node.settings.upload_idle_timeout_s)

    async def _receive_frame(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int) -> bytearray:
        """One frame of a PUT, read into a buffer reserved in the upload budget first."""
        uploads = self._node.uploads
        try:
            uploads.reserve(size)
        except OverBudget as exc:
            raise _refusal(exc) from exc
        try:
            self._node.metrics.pending_upload_bytes.set(uploads.used_bytes)
            # NOTE: the one allocation of this frame, after its size was checked and reserved.
            frame = bytearray(size)
            await recv_into(loop, conn, memoryview(frame), idle_s=self._node.settings.upload_idle_timeout_s)
            return frame
        finally:
            uploads.release(size)
            self._node.metrics.pending_upload_bytes.set(uploads.used_bytes)

    async def _get(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, caller: Caller, length: int) -> None:
        node = self._node
        node.metrics.requests.labels("DataGet").inc()
        if length > MAX_GET_BYTES:
            raise ProtocolError(f"a GET body of {length} bytes; at most {MAX_GET_BYTES}")
        keys = parse_get(await self._read(loop, conn, length))
        try:
            stored_keys = [BlockKey(caller.stored_key(key)) for key in keys]
        except RequestRejected as exc:
            raise _refusal(exc) from exc
        frames: list[Buffer | None] = [node.store.get_frame(key) for key in stored_keys]
        hits = sum(frame is not None for frame in frames)
        node.metrics.blocks.labels("DataGet", "hit").inc(hits)
        node.metrics.blocks.labels("DataGet", "miss").inc(len(frames) - hits)
        head = encode_frames_head([0 if f is None else memoryview(f).nbytes for f in frames])
        # A reader that stops taking bytes for the idle timeout loses the connection.
        await send_all(
            loop, conn, [head, *(f for f in frames if f is not None)], idle_s=node.settings.upload_idle_timeout_s
        )
