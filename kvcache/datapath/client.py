"""The client side of the framed data protocol: puts and gets to one node's data port.

`DataClient` keeps a few open, authenticated connections to a node (one call
uses one connection at a time; concurrent calls open more) and moves frames
with the socket calls of `kvcache.datapath.protocol`: a put writes the
frames from the caller's buffers, a get reads each frame straight into a
buffer of its own, allocated only after its length is checked against the
node's per-block maximum and the client's.

It raises the kvcache error hierarchy as `kvcache.client` does for gRPC:
unreachable, reset or refused for leaving or for the token:
`TierUnavailable` (or `TierTimeout` past the deadline); a request the node
refuses for good, or an answer that breaks the protocol: `TierRejected`. A
connection that fails in any way is closed, never reused.

Frames are checked by the caller's `check` as each arrives (the L2 tier
passes `kvcache.framing.open_frame`), or returned unchecked without one.

Who uses it: `kvcache.client.NodeClient`, once the node has named its data
port over gRPC. Not here: deciding whether a node has a data port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence

from kvcache.datapath.protocol import (
    HEADER_SIZE,
    MAX_KEYS,
    MAX_REPLY_BYTES,
    MessageType,
    PeerClosed,
    ProtocolError,
    Status,
    encode_get,
    encode_put_head,
    header,
    parse_count,
    parse_error,
    parse_header,
    parse_lengths,
    parse_stored,
    parse_u64,
    recv_exact,
    recv_into,
    send_all,
    tune,
)
from kvcache.errors import TierError, TierRejected, TierTimeout, TierUnavailable
from kvcache.framing import Buffer

#: Checks a frame read for a key (True: usable).
FrameCheck = Callable[[bytes, Buffer], bool]

#: Idle connections kept per node.
MAX_IDLE_CONNECTIONS = 4

_RETRYABLE = {Status.UNAVAILABLE, Status.UNAUTHENTICATED}


class _Connection:
    """One authenticated connection and the node's per-block maximum it announced."""

    __slots__ = ("sock", "max_block")

    def __init__(self, sock: socket.socket, max_block: int) -> None:
        self.sock = sock
        self.max_block = max_block

    def alive(self) -> bool:
        """Whether the idle connection is still open (the node may have closed it)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # open, nothing pending
        except OSError:
            return False
        # End of stream, or bytes nobody asked for: either way unusable.
        return False


class DataClient:
    """Moves frames to and from one node's data port.

    Args:
        host: the node's host.
        port: its data port.
        token: sent in the HELLO (empty for an open node).
        timeout_s: deadline of a call, extended by `timeout_s` per
            `bytes_per_deadline` it moves (as the gRPC client splits its
            calls by message size).
        max_block_bytes: largest frame accepted from the node.
        bytes_per_deadline: bytes a call may move per `timeout_s`.
        tier: label used in errors.
        address: the node's gRPC address, named in errors.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str,
        timeout_s: float,
        max_block_bytes: int,
        bytes_per_deadline: int,
        tier: str = "l2",
        address: str = "",
    ) -> None:
        self._host = host.strip("[]")
        self._port = port
        self._token = token.encode()
        self._timeout = timeout_s
        self._max_block = max_block_bytes
        self._per_deadline = max(1, bytes_per_deadline)
        self._tier = tier
        self._name = f"{address or host} (data port {port})"
        self._idle: list[_Connection] = []
        self._closed = False

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            tune(sock)
            await loop.sock_connect(sock, address)
            await send_all(loop, sock, [header(MessageType.HELLO, len(self._token)) + self._token])
            body = await self._reply(loop, sock, MessageType.WELCOME)
            return _Connection(sock, parse_u64(body))
        except BaseException:
            sock.close()
            raise

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.alive():
                return conn
            conn.sock.close()
        return await self._connect(loop)

    def _release(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE_CONNECTIONS:
            conn.sock.close()
        else:
            self._idle.append(conn)

    async def _reply(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, expected: MessageType) -> bytearray:
        """The body of the next reply, which must be `expected` (or an ERROR, raised)."""
        kind, length = parse_header(await recv_exact(loop, sock, HEADER_SIZE))
        if kind not in (expected, MessageType.ERROR) or length > MAX_REPLY_BYTES:
            raise ProtocolError(f"reply of type {kind:#x} and {length} bytes where {expected.name} was due")
        body = await recv_exact(loop, sock, length)
        if kind == MessageType.ERROR:
            status, message = parse_error(body)
            raise self._refused(status, message)
        return body

    def _refused(self, status: int, message: str) -> TierError:
        text = f"{self._name}: {Status(status).name if status in Status._value2member_map_ else status} {message}"
        if status == Status.DEADLINE_EXCEEDED:
            return TierTimeout(self._tier, text)
        if status in _RETRYABLE:
            return TierUnavailable(self._tier, text)
        return TierRejected(self._tier, text)

    async def _call(self, work, moved: int):  # type: ignore[no-untyped-def]
        """Run `work(loop, conn, scope)` on a pooled connection under the call's deadline.

        A connection whose call failed in any way is closed (its stream state
        is unknown); one whose call succeeded goes back to the pool.
        """
        if self._closed:
            raise TierUnavailable(self._tier, f"{self._name}: client closed")
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout * (1 + moved // self._per_deadline)) as scope:
                conn = await self._acquire(loop)
                result = await work(loop, conn, scope)
        except BaseException as exc:
            if conn is not None:
                conn.sock.close()
            if isinstance(exc, TimeoutError):
                raise TierTimeout(self._tier, f"{self._name}: no answer within the deadline") from exc
            if isinstance(exc, ProtocolError):
                raise TierRejected(self._tier, f"{self._name}: {exc}") from exc
            if isinstance(exc, (PeerClosed, OSError)):
                raise TierUnavailable(self._tier, f"{self._name}: {exc}") from exc
            raise
        self._release(conn)
        return result

    async def put(self, items: Sequence[tuple[bytes, Buffer]]) -> tuple[int, int]:
        """Store frames (at most `MAX_KEYS` per message; the caller splits by bytes).

        Frames above the node's per-block maximum are not sent; they count
        as rejected, as the node would count them.

        Returns:
            (stored, rejected).

        Raises:
            TierError: the node did not take the writes.
        """
        views = [(key, memoryview(frame).cast("B")) for key, frame in items]
        moved = sum(view.nbytes for _, view in views)

        async def work(loop, conn, scope):  # type: ignore[no-untyped-def]
            stored = rejected = 0
            fitting = [(key, view) for key, view in views if view.nbytes <= conn.max_block]
            rejected += len(views) - len(fitting)
            for start in range(0, len(fitting), MAX_KEYS):
                batch = fitting[start : start + MAX_KEYS]
                head = encode_put_head([(key, view.nbytes) for key, view in batch])
                await send_all(loop, conn.sock, [head, *(view for _, view in batch)])
                done, refused = parse_stored(await self._reply(loop, conn.sock, MessageType.STORED))
                stored, rejected = stored + done, rejected + refused
            return stored, rejected

        return await self._call(work, moved)  # type: ignore[no-any-return]

    async def get(self, keys: Sequence[bytes], *, check: FrameCheck | None = None) -> list[bytearray | None]:
        """The stored frame of each key, or None.

        Args:
            keys: the keys.
            check: called with each key and frame as soon as the frame has
                arrived (while it is still in the CPU's cache: checking the
                whole batch afterwards costs a second trip through memory);
                a frame it refuses is returned as None. Without it frames are
                returned unchecked.

        Raises:
            TierError: the node did not answer, or answered out of protocol.
        """

        async def work(loop, conn, scope):  # type: ignore[no-untyped-def]
            frames: list[bytearray | None] = []
            limit = min(self._max_block, conn.max_block)
            for start in range(0, len(keys), MAX_KEYS):
                batch = keys[start : start + MAX_KEYS]
                await send_all(loop, conn.sock, [encode_get(batch)])
                kind, length = parse_header(await recv_exact(loop, conn.sock, HEADER_SIZE))
                if kind == MessageType.ERROR:
                    if length > MAX_REPLY_BYTES:
                        raise ProtocolError(f"ERROR of {length} bytes")
                    raise self._refused(*parse_error(await recv_exact(loop, conn.sock, length)))
                if kind != MessageType.FRAMES:
                    raise ProtocolError(f"reply of type {kind:#x} to a GET")
                count = parse_count(await recv_exact(loop, conn.sock, 4))
                if count != len(batch):
                    raise ProtocolError(f"{count} frames for {len(batch)} keys")
                lengths = parse_lengths(await recv_exact(loop, conn.sock, 8 * count))
                if any(n > limit for n in lengths) or 4 + 8 * count + sum(lengths) != length:
                    raise ProtocolError("frame lengths beyond the block limit or the message")
                scope.reschedule(loop.time() + self._timeout * (1 + sum(lengths) // self._per_deadline))
                for asked, size in zip(batch, lengths):
                    if not size:
                        frames.append(None)
                        continue
                    # NOTE: the one copy of a frame on this side: kernel to its own buffer.
                    frame = bytearray(size)
                    await recv_into(loop, conn.sock, memoryview(frame))
                    frames.append(frame if check is None or check(asked, frame) else None)
            return frames

        return await self._call(work, 0)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Close the idle connections (calls in flight close theirs when they end)."""
        self._closed = True
        while self._idle:
            with contextlib.suppress(OSError):
                self._idle.pop().sock.close()
