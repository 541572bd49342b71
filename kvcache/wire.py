"""Hand-rolled protobuf encoding of the two bulk L2 messages, `PutRequest` and `GetResponse`.

Why: the generated protobuf classes copy every frame several times (into the
message, into the serialised string, out again on access). For the messages
that carry frames, the node and the client write and read the protobuf wire
format themselves: encoding is one join, decoding slices the received bytes.
The bytes on the wire are exactly what the generated classes would produce and
accept (tested both ways), so any client built from proto/kvcache.proto
interoperates.

Not here: the small messages (keys, flags, stats), which use the generated
classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvcache.framing import Buffer

_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5


class WireError(ValueError):
    """Bytes that are not a valid encoding of the expected message."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field; values of length-delimited
    fields are views into `data` (no copy)."""
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, kind = tag >> 3, tag & 7
        if kind == _VARINT:
            value, pos = _read_varint(data, pos)
            yield number, kind, value
        elif kind == _LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise WireError("truncated field")
            yield number, kind, data[pos : pos + length]
            pos += length
        elif kind == _I64:
            pos += 8
        elif kind == _I32:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {kind}")
    if pos != len(data):
        raise WireError("truncated fixed-width field")


def encode_put_request(items: Sequence[tuple[bytes, Buffer]]) -> bytes:
    """`PutRequest{blocks: [Block{key, frame}, ...]}` with one copy of the frames."""
    parts: list[Buffer] = []
    for key, frame in items:
        size = memoryview(frame).nbytes
        # proto3 leaves empty fields out; so do we, to match byte for byte.
        head = (b"\x0a" + _varint(len(key)) + key if key else b"") + (b"\x12" + _varint(size) if size else b"")
        parts += (b"\x0a", _varint(len(head) + size), head, frame)
    return b"".join(parts)


def decode_put_request(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, frame) pairs of a `PutRequest`, each frame copied out once.

    Raises:
        WireError: malformed bytes.
    """
    blocks: list[tuple[bytes, bytes]] = []
    for number, kind, value in fields(memoryview(data)):
        if number != 1 or kind != _LEN:
            continue
        key = frame = b""
        assert isinstance(value, memoryview)
        for inner, inner_kind, inner_value in fields(value):
            if inner_kind != _LEN:
                continue
            assert isinstance(inner_value, memoryview)
            if inner == 1:
                key = bytes(inner_value)
            elif inner == 2:
                frame = bytes(inner_value)
        blocks.append((key, frame))
    return blocks


def encode_get_response(frames: Sequence[Buffer | None], served: int) -> bytes:
    """`GetResponse{frames, served}`; None is encoded as an empty frame (absent)."""
    parts: list[Buffer] = []
    for frame in frames:
        if frame is None:
            parts.append(b"\x0a\x00")
        else:
            parts += (b"\x0a", _varint(memoryview(frame).nbytes), frame)
    if served:
        parts += (b"\x10", _varint(served))
    return b"".join(parts)


def decode_get_response(data: bytes) -> tuple[list[bytes | None], int]:
    """Frames (None where absent) and `served` of a `GetResponse`.

    Raises:
        WireError: malformed bytes.
    """
    frames: list[bytes | None] = []
    served = 0
    for number, kind, value in fields(memoryview(data)):
        if number == 1 and kind == _LEN:
            assert isinstance(value, memoryview)
            frames.append(bytes(value) if len(value) else None)
        elif number == 2 and kind == _VARINT:
            assert isinstance(value, int)
            served = value
    return frames, served
