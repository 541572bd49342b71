"""The hand-rolled bulk messages are byte-compatible with the generated protobuf classes."""

from __future__ import annotations

import pytest

from kvcache._pb import kvcache_pb2 as pb
from kvcache.wire import (
    WireError,
    decode_get_response,
    decode_put_request,
    encode_get_response,
    encode_put_request,
)

ITEMS = [(b"k" * 32, b"frame-1"), (b"q" * 32, bytes(range(256)) * 700), (b"e" * 32, b"")]


def test_a_put_request_we_encode_is_what_protobuf_encodes() -> None:
    ours = encode_put_request(ITEMS)
    generated = pb.PutRequest(blocks=[pb.Block(key=k, frame=f) for k, f in ITEMS]).SerializeToString()
    assert ours == generated
    assert [(b.key, b.frame) for b in pb.PutRequest.FromString(ours).blocks] == ITEMS


def test_a_put_request_protobuf_encodes_decodes_here() -> None:
    generated = pb.PutRequest(blocks=[pb.Block(key=k, frame=f) for k, f in ITEMS]).SerializeToString()
    assert decode_put_request(generated) == ITEMS


@pytest.mark.parametrize("served", [0, 1, 3, 300])
def test_a_get_response_round_trips_both_ways(served: int) -> None:
    frames = [b"abc", None, bytes(70_000)]
    ours = encode_get_response(frames, served)
    parsed = pb.GetResponse.FromString(ours)
    assert list(parsed.frames) == [b"abc", b"", bytes(70_000)]
    assert parsed.served == served
    generated = pb.GetResponse(frames=[b"abc", b"", bytes(70_000)], served=served).SerializeToString()
    assert decode_get_response(generated) == (frames, served)


def test_unknown_fields_are_skipped() -> None:
    message = pb.GetResponse(frames=[b"x"], served=1).SerializeToString() + b"\x18\x05" + b"\x22\x02hi"
    assert decode_get_response(message) == ([b"x"], 1)


@pytest.mark.parametrize("data", [b"\x0a\x05abc", b"\x0a", b"\x80", b"\x0f"], ids=["short", "no-length", "varint", "type"])
def test_malformed_bytes_are_wire_errors(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_get_response(data)
