"""The events replicas send each other, and their wire form (msgpack).

One stream entry carries one batch of a replica's events, each a short list
tagged by its first item:

    ["r", pod, uncached_tokens, hashes]   reserved; `hashes` = the block hashes, concatenated
    ["f", pod, uncached_tokens]           first token
    ["x", pod, uncached_tokens, decoding] released
    ["c", user, cost]                     charged
    ["u", user, active]                   the user's active requests on that replica
    ["s", {pod: [in_flight, pending, decoding]}, {user: active}]
                                          the replica's whole state (after a (re)connect)

A snapshot of a replica's state (its lease key) is the same `["s", ...]` list.
Anything undecodable raises `ValueError`; the reader skips that entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from kvcache.keys import BlockHash

HASH_BYTES = 16

RESERVED, FIRST_TOKEN, RELEASED, CHARGED, USER, SNAPSHOT = "r", "f", "x", "c", "u", "s"


def join_hashes(hashes: Sequence[BlockHash]) -> bytes:
    return b"".join(hashes)


def split_hashes(blob: bytes) -> list[BlockHash]:
    """The block hashes of a `reserved` event.

    Raises:
        ValueError: the blob is not bytes, or not a whole number of hashes.
    """
    if not isinstance(blob, bytes):
        raise ValueError(f"block hashes must be bytes, not {type(blob).__name__}")
    if len(blob) % HASH_BYTES:
        raise ValueError(f"block hashes of {len(blob)} bytes are not a multiple of {HASH_BYTES}")
    return [BlockHash(blob[i : i + HASH_BYTES]) for i in range(0, len(blob), HASH_BYTES)]


def snapshot(load: Mapping[str, Sequence[int]], users: Mapping[str, int]) -> list[Any]:
    return [SNAPSHOT, {pod: list(row) for pod, row in load.items()}, dict(users)]


def encode(events: Sequence[Sequence[Any]]) -> bytes:
    return msgpack.packb(events, use_bin_type=True)


def decode(payload: bytes) -> list[list[Any]]:
    """A batch of events.

    Raises:
        ValueError: not a msgpack list of tagged lists.
    """
    try:
        events = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ValueError(f"undecodable state batch: {exc}") from exc
    if not isinstance(events, list) or not all(isinstance(e, list) and e and isinstance(e[0], str) for e in events):
        raise ValueError("state batch is not a list of tagged events")
    return events


def decode_snapshot(payload: bytes) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The load and users of a replica's snapshot key (one `["s", ...]` event, not a batch).

    Raises:
        ValueError: undecodable, or not a well-formed snapshot.
    """
    try:
        event = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ValueError(f"undecodable snapshot: {exc}") from exc
    return check_snapshot(event)


def check_snapshot(event: Any) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The load and users of a snapshot event.

    Raises:
        ValueError: not a well-formed snapshot.
    """
    if not (isinstance(event, list) and len(event) == 3 and event[0] == SNAPSHOT):
        raise ValueError("not a snapshot")
    load, users = event[1], event[2]
    if not isinstance(load, dict) or not isinstance(users, dict):
        raise ValueError("snapshot parts are not maps")
    for row in load.values():
        if not (isinstance(row, list) and len(row) == 3 and all(isinstance(v, int) for v in row)):
            raise ValueError("snapshot load row is not three integers")
    if not all(isinstance(v, int) for v in users.values()):
        raise ValueError("snapshot user counts are not integers")
    return load, users
