"""Block frames: what a check accepts and what it turns into a miss."""

from __future__ import annotations

import pytest

from kvcache.errors import CorruptBlock
from kvcache.framing import corruption_reason, encode, header_size, new_frame, open_frame, payload_of, seal

KEY = b"k" * 32


def test_a_sealed_frame_opens_to_its_payload_without_copying() -> None:
    frame = encode(KEY, b"hello world")
    payload = open_frame(KEY, frame)
    assert bytes(payload) == b"hello world"
    assert payload.obj is frame
    assert len(frame) == header_size(KEY) + 11


def test_parts_are_laid_end_to_end() -> None:
    assert bytes(payload_of(encode(KEY, [b"ab", bytearray(b"cd"), memoryview(b"ef")]))) == b"abcdef"


def test_a_frame_filled_in_place_checks_once_sealed() -> None:
    frame, body = new_frame(KEY, 4)
    body[:] = b"wxyz"
    seal(frame)
    assert bytes(open_frame(KEY, frame)) == b"wxyz"


def _damaged(offset: int) -> bytearray:
    frame = encode(KEY, bytes(range(200)))
    frame[offset] ^= 1
    return frame


@pytest.mark.parametrize(
    ("frame", "key", "reason"),
    [
        pytest.param(_damaged(0), KEY, "magic", id="magic"),
        pytest.param(_damaged(header_size(KEY) + 100), KEY, "checksum", id="payload-bit"),
        pytest.param(encode(KEY, b"x" * 10)[:-1], KEY, "length", id="truncated"),
        pytest.param(encode(KEY, b"x" * 10) + b"\0", KEY, "length", id="padded"),
        pytest.param(b"KVG", KEY, "length", id="shorter-than-header"),
        pytest.param(encode(KEY, b"x"), b"o" * 32, "key", id="other-key"),
    ],
)
def test_a_bad_frame_is_refused_with_its_reason(frame: bytes, key: bytes, reason: str) -> None:
    with pytest.raises(CorruptBlock) as caught:
        open_frame(key, frame)
    assert corruption_reason(caught.value) == reason
