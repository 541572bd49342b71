"""The framed TCP data protocol of the cache nodes: message layout and socket I/O.

gRPC carries the control calls of `proto/kvcache.proto`; the bulk of the
bytes, frames put to and read from a node, can travel over this plainer
protocol instead, on a second port the node names in its ``DataPath`` reply.
It exists because Python gRPC copies every message several times and costs
about 200 µs per call (measured by ``scripts/bench_kvcache.py --sections
l2``); here a frame goes from the sender's buffer to the socket, and from the
socket into the one buffer the receiver keeps, with no copy in between.

Every message is a 16-byte header then a body (all integers little endian)::

    magic "KVGD" | version u8 | type u8 | reserved u16 (0) | body length u64

The message types, their bodies and the rules each side enforces are
documented byte by byte in proto/README.md; this module holds the constants,
the encoders and decoders of the small parts (headers, directories), and the
socket helpers both sides read and write with (`recv_exact`, `recv_into`,
`send_all`), which run on the event loop's non-blocking socket calls.

Who uses it: `kvcache.datapath.listener` (the node) and
`kvcache.datapath.client` (the L2 client). Not here: authentication, budgets
and storage (the listener), pooling and retries (the client).
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
from collections.abc import Sequence

from kvcache.framing import Buffer
from kvcache.uploads import MAX_KEY_BYTES

MAGIC = b"KVGD"
VERSION = 1
HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = HEADER.size
#: Most keys one PUT or GET names (as the gRPC calls).
MAX_KEYS = 4096
#: Largest HELLO body (the token).
MAX_HELLO_BYTES = 512
#: Largest body of a reply other than FRAMES (a status or an error text).
MAX_REPLY_BYTES = 4096
#: Largest PUT directory: MAX_KEYS entries of key length, key and frame length.
MAX_DIRECTORY_BYTES = MAX_KEYS * (1 + MAX_KEY_BYTES + 8)
#: Largest GET body: a count, then MAX_KEYS entries of key length and key.
MAX_GET_BYTES = 4 + MAX_KEYS * (1 + MAX_KEY_BYTES)
#: Buffers handed to one sendmsg (Linux's IOV_MAX is 1024).
_MAX_IOV = 512
_COUNT = struct.Struct("<I")
_PUT_HEAD = struct.Struct("<II")
_STORED = struct.Struct("<II")
_U64 = struct.Struct("<Q")


class MessageType(enum.IntEnum):
    """The `type` byte of a header: requests below 0x80, replies above."""

    HELLO = 0x01
    PUT = 0x02
    GET = 0x03
    WELCOME = 0x81
    STORED = 0x82
    FRAMES = 0x83
    ERROR = 0xFF


class Status(enum.IntEnum):
    """Status byte of an ERROR body: the gRPC status code of the same refusal."""

    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 8
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ProtocolError(ValueError):
    """Bytes that break the protocol (bad magic, a length beyond its bound, a short body)."""


class PeerClosed(ConnectionError):
    """The other side closed the connection (possibly mid-message)."""


def header(kind: MessageType, body_length: int) -> bytes:
    """The 16-byte header of a message."""
    return HEADER.pack(MAGIC, VERSION, kind, 0, body_length)


def parse_header(data: Buffer) -> tuple[int, int]:
    """(type, body length) of a header.

    Raises:
        ProtocolError: wrong magic or version, reserved bits set.
    """
    magic, version, kind, reserved, length = HEADER.unpack(data)
    if magic != MAGIC or version != VERSION or reserved:
        raise ProtocolError(f"not a v{VERSION} data message (magic {bytes(magic)!r}, version {version})")
    return kind, length


def encode_put_head(items: Sequence[tuple[bytes, int]]) -> bytes:
    """Header, count, directory length and directory of a PUT of (key, frame length) pairs."""
    directory = b"".join(bytes((len(key),)) + key + _U64.pack(length) for key, length in items)
    body = _PUT_HEAD.size + len(directory) + sum(length for _, length in items)
    return header(MessageType.PUT, body) + _PUT_HEAD.pack(len(items), len(directory)) + directory


def parse_put_head(data: Buffer) -> tuple[int, int]:
    """(count, directory length) of a PUT body's first 8 bytes.

    Raises:
        ProtocolError: more than `MAX_KEYS` blocks or an oversized directory.
    """
    count, size = _PUT_HEAD.unpack(data)
    if count > MAX_KEYS or size > MAX_DIRECTORY_BYTES:
        raise ProtocolError(f"a PUT of {count} blocks with a {size}-byte directory is beyond the limits")
    return count, size


def parse_directory(data: Buffer, count: int) -> list[tuple[bytes, int]]:
    """The (key, frame length) entries of a PUT directory.

    Raises:
        ProtocolError: entries that do not fill the directory exactly.
    """
    view = memoryview(data)
    entries: list[tuple[bytes, int]] = []
    pos = 0
    for _ in range(count):
        if pos >= len(view):
            raise ProtocolError("directory shorter than its count")
        size = view[pos]
        end = pos + 1 + size + 8
        if end > len(view):
            raise ProtocolError("directory entry beyond the directory")
        entries.append((bytes(view[pos + 1 : pos + 1 + size]), _U64.unpack_from(view, pos + 1 + size)[0]))
        pos = end
    if pos != len(view):
        raise ProtocolError("directory longer than its count")
    return entries


def encode_get(keys: Sequence[bytes]) -> bytes:
    """A whole GET message."""
    body = _COUNT.pack(len(keys)) + b"".join(bytes((len(key),)) + key for key in keys)
    return header(MessageType.GET, len(body)) + body


def parse_get(data: Buffer) -> list[bytes]:
    """The keys of a GET body.

    Raises:
        ProtocolError: more than `MAX_KEYS` keys, or entries that do not fill the body.
    """
    view = memoryview(data)
    if len(view) < _COUNT.size:
        raise ProtocolError("GET body shorter than its count")
    (count,) = _COUNT.unpack_from(view)
    if count > MAX_KEYS:
        raise ProtocolError(f"a GET of {count} keys; at most {MAX_KEYS}")
    keys: list[bytes] = []
    pos = _COUNT.size
    for _ in range(count):
        if pos >= len(view) or pos + 1 + view[pos] > len(view):
            raise ProtocolError("GET key beyond the body")
        keys.append(bytes(view[pos + 1 : pos + 1 + view[pos]]))
        pos += 1 + view[pos]
    if pos != len(view):
        raise ProtocolError("GET body longer than its keys")
    return keys


def encode_frames_head(lengths: Sequence[int]) -> bytes:
    """Header, count and lengths of a FRAMES reply (0 stands for an absent key)."""
    table = _COUNT.pack(len(lengths)) + b"".join(_U64.pack(n) for n in lengths)
    return header(MessageType.FRAMES, len(table) + sum(lengths)) + table


def parse_lengths(data: Buffer) -> list[int]:
    """The frame lengths of a FRAMES reply's table (after its count)."""
    return [length for (length,) in _U64.iter_unpack(data)]


def encode_stored(stored: int, rejected: int) -> bytes:
    """A whole STORED reply."""
    return header(MessageType.STORED, _STORED.size) + _STORED.pack(stored, rejected)


def parse_stored(data: Buffer) -> tuple[int, int]:
    """(stored, rejected) of a STORED body."""
    if len(data) != _STORED.size:
        raise ProtocolError(f"STORED body of {len(data)} bytes")
    return _STORED.unpack(data)


def encode_error(status: Status, message: str) -> bytes:
    """A whole ERROR message (the text cut to fit `MAX_REPLY_BYTES`)."""
    body = bytes((status,)) + message.encode()[: MAX_REPLY_BYTES - 1]
    return header(MessageType.ERROR, len(body)) + body


def parse_error(data: Buffer) -> tuple[int, str]:
    """(status, message) of an ERROR body."""
    view = bytes(data)
    if not view:
        raise ProtocolError("empty ERROR body")
    return view[0], view[1:].decode(errors="replace")


def encode_u64(value: int) -> bytes:
    """A u64."""
    return _U64.pack(value)


def parse_u64(data: Buffer) -> int:
    """A u64."""
    return _U64.unpack(data)[0]


def parse_count(data: Buffer) -> int:
    """A u32."""
    return _COUNT.unpack(data)[0]


async def recv_into(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview, *, idle_s: float | None = None
) -> None:
    """Fill `view` from the socket, straight from the kernel (no copy in between).

    Args:
        loop: the running loop.
        sock: a non-blocking socket.
        view: where the bytes go.
        idle_s: longest wait for the next bytes (None: no limit); a sender
            that stalls longer raises TimeoutError.

    NOTE: bytes already in the socket are taken without a trip through the
    loop, and a timer is armed only when there is nothing to take.

    Raises:
        PeerClosed: the connection ended first.
    """
    received = 0
    total = view.nbytes
    while received < total:
        try:
            count = sock.recv_into(view[received:])
        except (BlockingIOError, InterruptedError):
            if idle_s is None:
                count = await loop.sock_recv_into(sock, view[received:])
            else:
                async with asyncio.timeout(idle_s):
                    count = await loop.sock_recv_into(sock, view[received:])
        if not count:
            raise PeerClosed(f"connection closed {total - received} bytes short")
        received += count


async def recv_exact(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int, *, idle_s: float | None = None
) -> bytearray:
    """`size` bytes from the socket, in a new buffer (`idle_s` as in `recv_into`).

    Raises:
        PeerClosed: the connection ended first.
    """
    buffer = bytearray(size)
    await recv_into(loop, sock, memoryview(buffer), idle_s=idle_s)
    return buffer


async def send_all(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, parts: Sequence[Buffer], *, idle_s: float | None = None
) -> None:
    """Write buffers whole, in order, from where they are (no copy, no joining).

    Args:
        loop: the running loop.
        sock: a non-blocking socket.
        parts: the buffers, sent back to back.
        idle_s: longest wait for the socket to take more (None: no limit);
            a reader that stalls longer raises TimeoutError.

    NOTE: one ``sendmsg`` hands the kernel as many buffers as fit (a header
    and the frames of a batch), where a call per buffer would cost a system
    call, and often a trip through the loop, per frame.
    """
    views = [view for view in (memoryview(part).cast("B") for part in parts) if view.nbytes]
    first = 0
    while first < len(views):
        try:
            sent = sock.sendmsg(views[first : first + _MAX_IOV])
        except (BlockingIOError, InterruptedError):
            sent = 0
        while first < len(views) and sent >= views[first].nbytes:
            sent -= views[first].nbytes
            first += 1
        if first < len(views) and sent:
            views[first] = views[first][sent:]
        elif first < len(views):
            await _writable(loop, sock, idle_s)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket, idle_s: float | None) -> None:
    """Wait until the socket can take more bytes."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        if idle_s is None:
            await ready
        else:
            async with asyncio.timeout(idle_s):
                await ready
    finally:
        loop.remove_writer(sock.fileno())


def tune(sock: socket.socket) -> None:
    """Options of every data connection: no Nagle delay (a reply is often one small write)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
