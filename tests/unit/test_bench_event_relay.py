"""The KV event relay joins a connecting publisher and a connecting subscriber on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

zmq = pytest.importorskip("zmq")

from kvgate.bench.event_relay import EventRelay


def test_frames_published_into_the_relay_reach_a_subscriber_unchanged():
    relay = EventRelay()
    relay.start()
    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    subscriber = context.socket(zmq.SUB)
    try:
        assert relay.inbound.startswith("tcp://127.0.0.1:") and relay.outbound.startswith("tcp://127.0.0.1:")
        publisher.connect(relay.inbound)  # as vLLM does with a named host
        subscriber.connect(relay.outbound)  # as vllm-router does
        subscriber.setsockopt(zmq.SUBSCRIBE, b"kv@")
        frames = [b"kv@engine-0", (7).to_bytes(8, "big"), b"payload"]
        received = None
        deadline = time.monotonic() + 10
        # ZMQ subscriptions take a moment to travel up the relay: publish until one arrives.
        while received is None and time.monotonic() < deadline:
            publisher.send_multipart(frames)
            if subscriber.poll(100):
                received = subscriber.recv_multipart()
        assert received == frames
        publisher.send_multipart([b"other-topic", b"x"])
        assert not subscriber.poll(200)  # the subscription filter still applies
    finally:
        publisher.close(linger=0)
        subscriber.close(linger=0)
        context.term()
        relay.stop()
        relay.stop()
