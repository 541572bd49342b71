"""Engine KV events confirm and correct the prefix index."""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import AsyncIterator

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
    blocks.apply([{**stored([11, 12], None, TOKENS[:8]), "extra_keys": [None, None]}])
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
        pytest.param({**stored([11], None, TOKENS[:4]), "extra_keys": [[["image-digest", 0]]]}, id="multimodal-blocks"),
    ],
)
def test_blocks_the_gateway_cannot_hash_alike_are_skipped(blocks, event):
    # Salted and named-adapter blocks are keyed, not skipped: see test_router_kv_event_keys.py.
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


@contextlib.asynccontextmanager
async def subscribed() -> AsyncIterator[tuple[PrefixIndex, KVEventListener, zmq.asyncio.Socket]]:
    """A listener subscribed to pod `POD` and a ZMQ publisher connected to it, as vLLM connects to an endpoint naming a host."""
    port = free_port()
    index = PrefixIndex()
    listener = KVEventListener(index, {POD: f"listen:tcp://127.0.0.1:{port}"}, B)
    listener.start()
    context = zmq.asyncio.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield index, listener, publisher
    finally:
        publisher.close()
        context.term()
        await listener.stop()


async def test_listener_applies_events_published_over_zmq():
    async with subscribed() as (index, listener, publisher):
        for seq in range(200):  # PUB drops until the connection is up: keep publishing
            batch = [float(seq), [stored([11, 12, 13], None, TOKENS)], None]
            await publisher.send_multipart([b"kv@a", seq.to_bytes(8, "big"), msgpack.packb(batch)])
            await asyncio.sleep(0.01)
            if index.blocks(POD) == 3:
                break
        assert index.match(chain_hashes(TOKENS, B)) == {POD: 3}


def test_block_size_follows_what_the_gateway_hashes_with():
    """Configured for 4 tokens per block, the engines report 8: their blocks are not skipped."""
    size = [B]
    blocks = EngineBlocks(POD, PrefixIndex(), lambda: size[0])
    tokens = list(range(100, 116))
    blocks.apply([stored([21, 22], None, tokens, size=8)])
    assert blocks.index.blocks(POD) == 0 and blocks.skipped == 2  # not what the gateway hashes with yet

    size[0] = 8  # the monitor learned the engines' block size
    blocks.apply([stored([21, 22], None, tokens, size=8)])
    assert blocks.index.match(chain_hashes(tokens, 8)) == {POD: 2}


async def test_the_gateway_listener_uses_the_block_size_the_engines_report():
    from router.discovery import StaticDiscovery
    from router.gateway import Gateway
    from router.settings import Settings

    settings = Settings()
    settings.routing.block_size = 128
    settings.discovery.kv_event_sources = (f"{POD}=listen:tcp://127.0.0.1:{free_port()}",)
    gateway = Gateway(settings, discovery=StaticDiscovery([]))
    await gateway.start()
    try:
        assert gateway.monitor is not None and gateway.kv_events is not None
        gateway.monitor.block_size = 16  # as scraped from vllm:cache_config_info
        engine = gateway.kv_events.engines[POD]
        tokens = list(range(32))
        engine.apply([stored([1, 2], None, tokens, size=16)])
        assert gateway.index.match(chain_hashes(tokens, 16)) == {POD: 2}
    finally:
        await gateway.stop()


@pytest.mark.parametrize(
    "event",
    [
        pytest.param("BlockStored", id="not-a-map"),
        pytest.param({"type": "BlockStored", "block_hashes": 5, "token_ids": TOKENS[:4], "block_size": B}, id="hashes-not-a-list"),
        pytest.param(stored([11], None, ["a"] * B), id="tokens-not-ints"),
        pytest.param(stored([11], None, [2**70] * B), id="token-out-of-range"),
        pytest.param(stored([{"x": 1}], None, TOKENS[:4]), id="hash-is-a-map"),
        pytest.param({"type": "BlockRemoved", "block_hashes": "abc"}, id="removed-hashes-not-a-list"),
        pytest.param(stored([11], None, "abcd"), id="tokens-a-string"),
    ],
)
def test_a_malformed_event_is_counted_and_the_rest_of_the_batch_applied(blocks, event):
    blocks.apply([event, stored([11, 12, 13], None, TOKENS)])
    assert blocks.malformed == 1
    assert blocks.index.match(chain_hashes(TOKENS, B)) == {POD: 3}


def test_event_maps_hold_one_hash_per_block_not_a_path_per_block(blocks):
    """A chain stored block by block, as chunked prefill publishes it, costs memory linear in its length."""

    def stored_bytes(n: int) -> int:
        engine = EngineBlocks(POD, PrefixIndex(default_capacity=n), B)
        events = [stored([i], i - 1 if i else None, list(range(i * B, (i + 1) * B))) for i in range(n)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for event in events:
                engine.apply([event])
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert engine.index.blocks(POD) == n
        return used

    small, large = stored_bytes(500), stored_bytes(2000)
    assert large < 6 * small, f"500 blocks take {small} bytes, 2,000 take {large}"


async def publish_until(publisher, condition, batch_for, sequence=None) -> None:
    """PUB drops messages until the connection is up: keep publishing until `condition()`."""
    sequence = sequence if sequence is not None else iter(range(10**6))
    for _ in range(300):
        seq = next(sequence)
        await publisher.send_multipart([b"kv@a", seq.to_bytes(8, "big"), batch_for(seq)])
        await asyncio.sleep(0.01)
        if condition():
            return
    raise AssertionError("the listener never applied the events")


async def test_a_bad_batch_does_not_end_the_subscription():
    async with subscribed() as (index, listener, publisher):
        engine = listener.engines[POD]
        garbage = msgpack.packb([0.0, [{"type": "BlockRemoved", "block_hashes": 7}, "junk"], None])
        await publish_until(publisher, lambda: engine.malformed >= 2, lambda seq: garbage)
        await publisher.send_multipart([b"kv@a"])  # not even the frames of a message
        good = msgpack.packb([1.0, [stored([11, 12, 13], None, TOKENS)], None])
        await publish_until(publisher, lambda: index.blocks(POD) == 3, lambda seq: good)
        assert index.match(chain_hashes(TOKENS, B)) == {POD: 3}
        assert not listener._tasks[POD].done()


async def test_subscriptions_are_added_and_removed_at_run_time():
    index = PrefixIndex()
    listener = KVEventListener(index, {}, B)
    listener.start()
    context = zmq.asyncio.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    port = free_port()
    good = msgpack.packb([1.0, [stored([11, 12, 13], None, TOKENS)], None])
    try:
        listener.add(POD, f"listen:tcp://127.0.0.1:{port}")
        listener.add(POD, f"listen:tcp://127.0.0.1:{port}")  # again: nothing changes
        assert len(listener._tasks) == 1
        publisher.connect(f"tcp://127.0.0.1:{port}")
        await publish_until(publisher, lambda: index.blocks(POD) == 3, lambda seq: good)

        task = listener._tasks[POD]
        listener.remove(POD)
        assert POD not in listener.engines and POD not in listener.sources
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
        assert task.cancelled()

        # The port is free again once the subscription is gone: a new one can bind it.
        listener.add(POD, f"listen:tcp://127.0.0.1:{port}")
        index.drop_pod(POD)
        await publish_until(publisher, lambda: index.blocks(POD) == 3, lambda seq: good)
    finally:
        publisher.close()
        context.term()
        await listener.stop()
    assert not listener._tasks


async def test_an_oversized_message_is_refused_and_the_subscription_goes_on(monkeypatch):
    monkeypatch.setattr("router.kv_events.MAX_MESSAGE_BYTES", 64 * 1024)
    sequence = iter(range(10**6))
    huge = msgpack.packb([0.0, [stored(list(range(1000, 11_000)), None, [1] * (B * 10_000))], None])
    assert len(huge) > 64 * 1024
    first = msgpack.packb([1.0, [stored([11, 12, 13], None, TOKENS)], None])
    later_tokens = list(range(500, 512))
    later = msgpack.packb([2.0, [stored([21, 22, 23], None, later_tokens)], None])
    async with subscribed() as (index, listener, publisher):
        await publish_until(publisher, lambda: index.blocks(POD) == 3, lambda seq: first, sequence)
        for _ in range(3):
            await publisher.send_multipart([b"kv@a", next(sequence).to_bytes(8, "big"), huge])
        # Events sent after it still arrive (ZMQ reconnects the publisher it cut off).
        await publish_until(publisher, lambda: index.match(chain_hashes(later_tokens, B)) == {POD: 3}, lambda seq: later, sequence)
        assert 10_999 not in listener.engines[POD]._ours  # nothing of the huge batch was taken in
