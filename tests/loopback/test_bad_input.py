"""Bad input gets an OpenAI-shaped error with the right status, and the gateway keeps serving."""

from __future__ import annotations

import pytest

from tests.loopback.conftest import fast_settings, start_cluster

GOOD = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "param"),
    [
        pytest.param("/v1/chat/completions", {"data": b"{not json"}, 400, None, id="malformed-json"),
        pytest.param("/v1/chat/completions", {"data": b"\xff\xfe"}, 400, None, id="not-utf8"),
        pytest.param("/v1/chat/completions", {"data": b"[1, 2]"}, 400, None, id="not-an-object"),
        pytest.param("/v1/chat/completions", {"json": {"messages": GOOD["messages"]}}, 400, "model", id="missing-model"),
        pytest.param("/v1/chat/completions", {"json": {"model": "tiny-llama"}}, 400, "messages", id="missing-messages"),
        pytest.param("/v1/chat/completions", {"json": {**GOOD, "messages": "hi"}}, 400, "messages", id="messages-not-list"),
        pytest.param("/v1/chat/completions", {"json": {**GOOD, "messages": [{"content": "x"}]}}, 400, "messages[0].role", id="no-role"),
        pytest.param("/v1/chat/completions", {"json": {**GOOD, "max_tokens": "9"}}, 400, "max_tokens", id="max-tokens-string"),
        pytest.param("/v1/chat/completions", {"json": {**GOOD, "max_tokens": 10**12}}, 400, "max_tokens", id="max-tokens-absurd"),
        pytest.param("/v1/chat/completions", {"json": {**GOOD, "max_tokens": -1}}, 400, "max_tokens", id="max-tokens-negative"),
        pytest.param("/v1/chat/completions", {"json": {**GOOD, "stream": "yes"}}, 400, "stream", id="stream-not-bool"),
        pytest.param("/v1/chat/completions", {"json": {**GOOD, "temperature": "hot"}}, 400, "temperature", id="temperature-string"),
        pytest.param("/v1/completions", {"json": {"model": "tiny-llama", "prompt": 42}}, 400, "prompt", id="prompt-number"),
        pytest.param("/v1/completions", {"json": {"model": "tiny-llama", "prompt": []}}, 400, "prompt", id="prompt-empty"),
        pytest.param("/v1/completions", {"json": {"model": "tiny-llama", "prompt": [1, "a"]}}, 400, "prompt", id="prompt-mixed"),
        pytest.param("/v1/chat/completions", {"json": {**GOOD, "model": "gpt-9"}}, 404, "model", id="unknown-model"),
        pytest.param(
            "/v1/chat/completions", {"json": GOOD, "headers": {"x-routing-strategy": "fastest"}}, 400, "x-routing-strategy", id="unknown-strategy"
        ),
        pytest.param(
            "/v1/chat/completions", {"json": GOOD, "headers": {"x-routing-strategy": "random:-1"}}, 400, "x-routing-strategy", id="bad-weight"
        ),
        pytest.param("/v1/nothing", {"json": GOOD}, 404, None, id="unknown-path"),
    ],
)
async def test_bad_request_is_refused_in_openai_shape(cluster, path, kwargs, status, param):
    async with cluster.http.post(cluster.url + path, **kwargs) as r:
        body = await r.json()
        assert r.status == status, body
        assert r.headers["content-type"].startswith("application/json")
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)
    if param is not None:
        assert body["error"]["param"] == param
    # Nothing reached a pod, nothing is left counted, and the gateway still serves.
    assert all(not e.calls for e in cluster.engines)
    assert all(p.in_flight == 0 for p in cluster.gateway.pods)
    async with await cluster.post("/v1/chat/completions", GOOD) as r:
        assert r.status == 200


async def test_wrong_method_is_405(cluster):
    async with cluster.http.get(cluster.url + "/v1/chat/completions") as r:
        body = await r.json()
    assert r.status == 405 and "error" in body


async def test_oversized_body_is_413():
    settings = fast_settings()
    settings.server.max_body_bytes = 64 * 1024
    async with start_cluster(1, settings) as cluster:
        huge = {**GOOD, "messages": [{"role": "user", "content": "x" * 100_000}]}
        async with await cluster.post("/v1/chat/completions", huge) as r:
            body = await r.json()
        assert r.status == 413 and body["error"]["type"] == "request_too_large"
        async with await cluster.post("/v1/chat/completions", GOOD) as r:
            assert r.status == 200


async def test_api_key_is_required_when_configured():
    settings = fast_settings()
    settings.server.api_keys = ("sesame",)
    async with start_cluster(1, settings) as cluster:
        async with await cluster.post("/v1/chat/completions", GOOD) as r:
            body = await r.json()
        assert r.status == 401 and body["error"]["type"] == "authentication_error"
        async with await cluster.post("/v1/chat/completions", GOOD, headers={"authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with await cluster.post("/v1/chat/completions", GOOD, headers={"authorization": "Bearer sesame"}) as r:
            assert r.status == 200
