"""The data protocol's messages are laid out as proto/README.md says, and lies in them are caught."""

from __future__ import annotations

import struct

import pytest

from kvcache.datapath.protocol import (
    MAX_DIRECTORY_BYTES,
    MAX_KEYS,
    MessageType,
    ProtocolError,
    Status,
    encode_error,
    encode_frames_head,
    encode_get,
    encode_put_head,
    encode_stored,
    header,
    parse_directory,
    parse_error,
    parse_get,
    parse_header,
    parse_lengths,
    parse_put_head,
    parse_stored,
)

K1, K2 = b"a" * 32, b"b" * 48


def test_a_header_is_16_bytes_magic_version_type_reserved_length() -> None:
    data = header(MessageType.PUT, 0x0102030405)
    assert data == b"KVGD" + bytes([1, 0x02, 0, 0]) + struct.pack("<Q", 0x0102030405)
    assert parse_header(data) == (MessageType.PUT, 0x0102030405)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"KVGB" + bytes([1, 2, 0, 0]) + bytes(8), id="magic"),
        pytest.param(b"KVGD" + bytes([2, 2, 0, 0]) + bytes(8), id="version"),
        pytest.param(b"KVGD" + bytes([1, 2, 1, 0]) + bytes(8), id="reserved"),
    ],
)
def test_a_header_that_is_not_version_1_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_header(data)


def test_a_put_head_is_counts_then_directory_and_its_length_covers_the_frames() -> None:
    data = encode_put_head([(K1, 100), (K2, 7)])
    kind, length = parse_header(data[:16])
    count, size = parse_put_head(data[16:24])
    assert (kind, count, size) == (MessageType.PUT, 2, len(data) - 24)
    assert length == 8 + size + 107
    assert parse_directory(data[24:], count) == [(K1, 100), (K2, 7)]
    assert data[24:] == bytes([32]) + K1 + struct.pack("<Q", 100) + bytes([48]) + K2 + struct.pack("<Q", 7)


@pytest.mark.parametrize(
    ("count", "size"),
    [pytest.param(MAX_KEYS + 1, 10, id="keys"), pytest.param(1, MAX_DIRECTORY_BYTES + 1, id="directory")],
)
def test_a_put_beyond_the_limits_is_refused_before_its_directory_is_read(count: int, size: int) -> None:
    with pytest.raises(ProtocolError):
        parse_put_head(struct.pack("<II", count, size))


@pytest.mark.parametrize(
    ("directory", "count"),
    [
        pytest.param(bytes([32]) + K1 + struct.pack("<Q", 1), 2, id="short"),
        pytest.param(bytes([32]) + K1 + struct.pack("<Q", 1) + b"x", 1, id="long"),
        pytest.param(bytes([40]) + K1 + struct.pack("<Q", 1), 1, id="key-beyond"),
    ],
)
def test_a_directory_that_does_not_add_up_is_refused(directory: bytes, count: int) -> None:
    with pytest.raises(ProtocolError):
        parse_directory(directory, count)


def test_get_round_trips_and_refuses_a_body_that_does_not_add_up() -> None:
    data = encode_get([K1, K2])
    assert parse_header(data[:16]) == (MessageType.GET, len(data) - 16)
    assert parse_get(data[16:]) == [K1, K2]
    with pytest.raises(ProtocolError):
        parse_get(data[16:-1])
    with pytest.raises(ProtocolError):
        parse_get(data[16:] + b"x")
    with pytest.raises(ProtocolError):
        parse_get(struct.pack("<I", MAX_KEYS + 1))


def test_replies_round_trip() -> None:
    frames = encode_frames_head([10, 0, 3])
    assert parse_header(frames[:16]) == (MessageType.FRAMES, 4 + 24 + 13)
    assert parse_lengths(frames[20:]) == [10, 0, 3]
    stored = encode_stored(5, 2)
    assert parse_stored(stored[16:]) == (5, 2)
    error = encode_error(Status.RESOURCE_EXHAUSTED, "full " * 2000)
    kind, length = parse_header(error[:16])
    assert kind == MessageType.ERROR and length == len(error) - 16 <= 4096
    status, message = parse_error(error[16:])
    assert status == Status.RESOURCE_EXHAUSTED and message.startswith("full")
