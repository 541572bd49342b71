"""Engine KV events confirm and correct the prefix index."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq
import zmq.asyncio

from kvcache.keys import chain_hashes
from kvgate.engines import free_port
from router.index import PrefixIndex
from router.kv_events import EngineBlocks, KVEventListener, decode_batch, parse_event_sources
from router.pods import PodId

B = 4
POD = PodId("http://pod-a")
TOKENS = list(range(100, 112))  # three blocks of 4


def stored(hashes, parent, tokens, size=B):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens, "block_size": size, "lora_id": None, "medium": "GPU"}


def removed(hashes):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


@pytest.fixture
def blocks() -> EngineBlocks:
    return EngineBlocks(POD, PrefixIndex(), B)


def test_stored_blocks_are_matched_by_the_gateways_own_hashes(blocks):
    blocks.apply([stored([11, 12], None, TOKENS[:8])])
    blocks.apply([stored([13], 12, TOKENS[8:12])])
    assert blocks.index.match(chain_hashes(TOKENS, B)) == {POD: 3}
    assert blocks.stored == 3


def test_a_block_whose_parent_was_never_seen_is_skipped(blocks):
    blocks.apply([stored([13], 99, TOKENS[8:12])])
    assert blocks.index.blocks(POD) == 0 and blocks.skipped == 1


def test_removed_block_is_forgotten_alone(blocks):
    blocks.apply([stored([11, 12, 13], None, TOKENS)])
    blocks.apply([removed([13])])
    assert blocks.index.match(chain_hashes(TOKENS, B)) == {POD: 2}
    blocks.apply([removed([11])])
    assert blocks.index.match(chain_hashes(TOKENS, B)) == {}  # the chain now breaks at block 0
    assert blocks.removed == 2


def test_all_blocks_cleared_and_lost_events_drop_the_pod(blocks):
    blocks.apply([stored([11, 12, 13], None, TOKENS)])
    blocks.apply([{"type": "AllBlocksCleared"}])
    assert blocks.index.blocks(POD) == 0
    blocks.sequence(5)
    blocks.apply([stored([11, 12, 13], None, TOKENS)])
    blocks.sequence(6)
    assert blocks.index.blocks(POD) == 3
    blocks.sequence(9)  # 7 and 8 were lost
    assert blocks.index.blocks(POD) == 0 and blocks.gaps == 1


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(stored([11], None, TOKENS[:8], size=8), id="other-block-size"),
        pytest.param(stored([11, 12], None, TOKENS[:4]), id="tokens-do-not-fill-blocks"),
        pytest.param({**stored([11], None, TOKENS[:4]), "lora_id": 3}, id="adapter-blocks"),
    ],
)
def test_blocks_the_gateway_cannot_hash_alike_are_skipped(blocks, event):
    blocks.apply([event])
    assert blocks.index.blocks(POD) == 0


def test_decode_batch_reads_vllms_frame_and_refuses_garbage():
    payload = msgpack.packb([1.5, [stored([1], None, TOKENS[:4]), {"type": "AllBlocksCleared"}], None])
    assert [e["type"] for e in decode_batch(payload)] == ["BlockStored", "AllBlocksCleared"]
    for bad in (b"\xc1", msgpack.packb({"ts": 1}), msgpack.packb([1.0])):
        with pytest.raises(ValueError):
            decode_batch(bad)


def test_parse_event_sources():
    assert parse_event_sources(["http://a:1/=tcp://a:5557"]) == {PodId("http://a:1"): "tcp://a:5557"}
    with pytest.raises(ValueError):
        parse_event_sources(["http://a:1"])


async def test_listener_applies_events_published_over_zmq():
    port = free_port()
    index = PrefixIndex()
    listener = KVEventListener(index, {POD: f"listen:tcp://127.0.0.1:{port}"}, B)
    listener.start()
    context = zmq.asyncio.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.connect(f"tcp://127.0.0.1:{port}")  # as vLLM does for an endpoint naming a host
    try:
        for seq in range(200):  # PUB drops until the connection is up: keep publishing
            batch = [float(seq), [stored([11, 12, 13], None, TOKENS)], None]
            await publisher.send_multipart([b"kv@a", seq.to_bytes(8, "big"), msgpack.packb(batch)])
            await asyncio.sleep(0.01)
            if index.blocks(POD) == 3:
                break
        assert index.match(chain_hashes(TOKENS, B)) == {POD: 3}
    finally:
        publisher.close()
        context.term()
        await listener.stop()
