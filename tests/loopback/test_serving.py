"""Serving through the gateway: chat and completions, streamed and not, models, metrics."""

from __future__ import annotations

import json

import pytest

from tests.loopback.conftest import start_cluster

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}


def sse_events(raw: bytes) -> list[str]:
    return [e[len("data: ") :] for e in raw.decode().split("\n\n") if e.startswith("data: ")]


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        pytest.param("/v1/chat/completions", CHAT, id="chat"),
        pytest.param("/v1/completions", {"model": "tiny-llama", "prompt": "once upon", "max_tokens": 3}, id="completion-text"),
        pytest.param("/v1/completions", {"model": "tiny-llama", "prompt": [1, 2, 3], "max_tokens": 3}, id="completion-ids"),
        pytest.param("/v1/completions", {"model": "tiny-llama", "prompt": ["a", "b"], "max_tokens": 3}, id="completion-batch"),
    ],
)
async def test_non_streamed_answer_is_relayed_whole(cluster, path, payload):
    async with await cluster.post(path, payload) as r:
        body = await r.json()
    assert r.status == 200, body
    assert body["usage"]["completion_tokens"] == 3
    engine = cluster.engine_at(r.headers["x-kvgate-pod"])
    assert engine.calls[-1]["body"] == payload  # forwarded untouched


async def test_stream_passes_every_event_and_strips_usage_not_asked_for(cluster):
    async with await cluster.post("/v1/chat/completions", {**CHAT, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = await r.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["tok "] * 3
    engine = cluster.engine_at(r.headers["x-kvgate-pod"])
    # The gateway asked the pod for usage (to charge the user) ...
    assert engine.calls[-1]["body"]["stream_options"] == {"include_usage": True}
    # ... and charged it: 2 x 3 output tokens on top of the prompt.
    assert cluster.gateway.counters.get("anonymous") >= 6


async def test_stream_keeps_usage_when_client_asks(cluster):
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "user": "u1"}
    async with await cluster.post("/v1/chat/completions", payload) as r:
        events = sse_events(await r.read())
    usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 3


async def test_stream_chunks_arrive_before_the_answer_ends():
    async with start_cluster(1) as cluster:
        cluster.engines[0].behaviour.chunk_delay_s = 0.3
        cluster.engines[0].behaviour.tokens = 3
        async with await cluster.post("/v1/completions", {"model": "tiny-llama", "prompt": "x", "stream": True}) as r:
            loop_time = __import__("asyncio").get_running_loop().time
            start = loop_time()
            first = await r.content.readuntil(b"\n\n")
            first_at = loop_time() - start
            rest = await r.read()
    assert first.startswith(b"data: ")
    assert first_at < 0.25, "first event was held back"
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_models_lists_what_the_pods_serve(cluster):
    async with cluster.http.get(cluster.url + "/v1/models") as r:
        body = await r.json()
    assert r.status == 200
    assert [m["id"] for m in body["data"]] == ["tiny-llama"]
    assert body["data"][0]["max_model_len"] == 4096


async def test_health_and_ready(cluster):
    async with cluster.http.get(cluster.url + "/health") as r:
        assert r.status == 200
    async with cluster.http.get(cluster.url + "/ready") as r:
        body = await r.json()
    assert r.status == 200 and body["healthy_pods"] == 2


async def test_metrics_show_decisions_and_engine_figures(cluster):
    for _ in range(3):
        async with await cluster.post("/v1/chat/completions", CHAT) as r:
            assert r.status == 200
    async with cluster.http.get(cluster.url + "/metrics") as r:
        text = await r.text()
    assert 'kvgate_requests_total{' in text and 'status="200"' in text
    assert "kvgate_routing_decision_seconds_count 3.0" in text
    assert "kvgate_matched_prefix_tokens_bucket" in text
    assert "kvgate_predicted_prefix_hit_tokens_total" in text
    assert "kvgate_pod_in_flight" in text
    assert "kvgate_admission_queue_length 0.0" in text
    for engine in cluster.engines:
        assert f'kvgate_engine_prefix_cache_hits_total{{pod="{engine.url}"}}' in text
