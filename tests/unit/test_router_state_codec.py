"""The wire form replicas share routing state in: msgpack batches of tagged events."""

from __future__ import annotations

import msgpack
import pytest

from kvcache.keys import BlockHash
from router.state import codec

H1, H2 = BlockHash(b"\x01" * 16), BlockHash(b"\x02" * 16)


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([], id="empty-batch"),
        pytest.param([[codec.RESERVED, "http://a", 128, codec.join_hashes([H1, H2])]], id="reserved"),
        pytest.param([[codec.FIRST_TOKEN, "http://a", 128], [codec.RELEASED, "http://a", 128, True]], id="first-token-released"),
        pytest.param([[codec.CHARGED, "alice", 12.5], [codec.USER, "alice", 0]], id="counters"),
        pytest.param([codec.snapshot({"http://a": (1, 2, 3)}, {"alice": 2})], id="snapshot"),
    ],
)
def test_batches_round_trip(events):
    assert codec.decode(codec.encode(events)) == [list(e) for e in events]


@pytest.mark.parametrize(
    ("hashes",),
    [
        pytest.param([], id="none"),
        pytest.param([H1], id="one"),
        pytest.param([H1, H2, H1], id="several-in-order"),
    ],
)
def test_block_hashes_join_and_split(hashes):
    assert codec.split_hashes(codec.join_hashes(hashes)) == hashes


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(b"\x01" * 15, id="short"),
        pytest.param(b"\x01" * 17, id="ragged"),
        pytest.param("0123456789abcdef", id="text-not-bytes"),
        pytest.param(None, id="none"),
    ],
)
def test_malformed_block_hashes_are_refused(blob):
    with pytest.raises(ValueError):
        codec.split_hashes(blob)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="not-msgpack"),
        pytest.param(msgpack.packb({"r": 1}), id="a-map"),
        pytest.param(msgpack.packb([["r"], "loose"]), id="an-untagged-item"),
        pytest.param(msgpack.packb([[]]), id="an-empty-event"),
        pytest.param(msgpack.packb([[7, 1]]), id="a-numeric-tag"),
        pytest.param(b"", id="empty"),
    ],
)
def test_undecodable_batches_raise_value_error(payload):
    with pytest.raises(ValueError):
        codec.decode(payload)


def test_snapshot_is_checked_and_split():
    load, users = codec.check_snapshot(codec.snapshot({"http://a": [1, 0, 1]}, {"bob": 1}))
    assert load == {"http://a": [1, 0, 1]} and users == {"bob": 1}


@pytest.mark.parametrize(
    "event",
    [
        pytest.param([codec.SNAPSHOT, {}], id="too-short"),
        pytest.param([codec.RESERVED, {}, {}], id="wrong-tag"),
        pytest.param([codec.SNAPSHOT, [], {}], id="load-not-a-map"),
        pytest.param([codec.SNAPSHOT, {"p": [1, 2]}, {}], id="row-of-two"),
        pytest.param([codec.SNAPSHOT, {"p": [1, 2, "3"]}, {}], id="row-with-text"),
        pytest.param([codec.SNAPSHOT, {}, {"u": 1.5}], id="fractional-user-count"),
        pytest.param("s", id="not-a-list"),
    ],
)
def test_malformed_snapshots_raise_value_error(event):
    with pytest.raises(ValueError):
        codec.check_snapshot(event)


def test_a_snapshot_key_decodes_to_its_load_and_users():
    payload = codec.encode(codec.snapshot({"http://a": (2, 64, 1)}, {"alice": 2}))

    assert codec.decode_snapshot(payload) == ({"http://a": [2, 64, 1]}, {"alice": 2})


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="not-msgpack"),
        pytest.param(codec.encode([codec.snapshot({}, {})]), id="a-batch-not-one-snapshot"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_snapshot_keys_raise_value_error(payload):
    with pytest.raises(ValueError):
        codec.decode_snapshot(payload)
