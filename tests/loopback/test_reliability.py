"""Pods failing: retries before the first byte, error events after it, pods taken out and put back."""

from __future__ import annotations

import asyncio
import json

from tests.loopback.conftest import start_cluster, wait_until

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


async def test_unreachable_pod_is_retried_on_another_and_taken_out():
    async with start_cluster(2) as cluster:
        bad, good = cluster.engines
        bad.behaviour.drop_connection = True
        for _ in range(6):
            async with await cluster.post("/v1/chat/completions", CHAT, headers={"x-routing-strategy": "round-robin"}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-kvgate-pod"] == good.url
        pod = cluster.gateway.pods.get(bad.url)
        assert pod is not None and pod.ejected  # out of rotation; health probes still answer
        assert all(p.in_flight == 0 for p in cluster.gateway.pods)


async def test_pod_answering_503_is_retried_elsewhere():
    async with start_cluster(2) as cluster:
        bad, good = cluster.engines
        bad.behaviour.fail_status = 503
        for _ in range(4):
            async with await cluster.post("/v1/completions", {"model": "tiny-llama", "prompt": "p", "max_tokens": 2}) as r:
                assert r.status == 200
                assert r.headers["x-kvgate-pod"] == good.url


async def test_client_errors_of_a_pod_are_passed_through_not_retried():
    async with start_cluster(1) as cluster:
        cluster.engines[0].behaviour.fail_status = 400
        async with await cluster.post("/v1/chat/completions", CHAT) as r:
            body = await r.json()
        assert r.status == 400 and body["error"]["message"] == "stub failure"
        assert len(cluster.engines[0].calls) == 1


async def test_every_pod_failing_gives_502_in_openai_shape():
    async with start_cluster(2) as cluster:
        for engine in cluster.engines:
            engine.behaviour.drop_connection = True
        async with await cluster.post("/v1/chat/completions", CHAT) as r:
            body = await r.json()
        assert r.status == 502 and body["error"]["type"] == "upstream_unavailable"
        assert all(p.in_flight == 0 for p in cluster.gateway.pods)


async def test_pod_dying_mid_stream_ends_the_stream_with_an_error_event():
    async with start_cluster(1) as cluster:
        cluster.engines[0].behaviour.tokens = 6
        cluster.engines[0].behaviour.die_after_chunks = 2
        async with await cluster.post("/v1/chat/completions", {**CHAT, "max_tokens": 6, "stream": True}) as r:
            assert r.status == 200
            raw = await asyncio.wait_for(r.read(), timeout=5)
        events = [e[6:] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
        assert len(events) == 3
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["tok ", "tok "]
        error = json.loads(events[2])["error"]
        assert error["type"] == "upstream_unavailable" and "broke off" in error["message"]
        assert "[DONE]" not in raw.decode()
        pod = cluster.gateway.pods.get(cluster.engines[0].url)
        assert pod is not None and pod.in_flight == 0 and pod.decoding == 0


async def test_pod_that_recovers_is_put_back():
    async with start_cluster(2) as cluster:
        flaky = cluster.engines[0]
        flaky.healthy = False
        pod = cluster.gateway.pods.get(flaky.url)
        assert pod is not None
        await wait_until(lambda: not pod.healthy)
        for _ in range(4):
            async with await cluster.post("/v1/chat/completions", CHAT) as r:
                assert r.headers["x-kvgate-pod"] != flaky.url
        flaky.healthy = True
        await wait_until(lambda: pod.healthy)


async def test_no_healthy_pod_is_503_and_not_ready():
    async with start_cluster(1) as cluster:
        cluster.engines[0].healthy = False
        await wait_until(lambda: not cluster.gateway.pods.healthy())
        async with await cluster.post("/v1/chat/completions", CHAT) as r:
            body = await r.json()
        assert r.status == 503 and body["error"]["type"] == "service_unavailable"
        async with cluster.http.get(cluster.url + "/ready") as r:
            assert r.status == 503
