"""Fuzzing the gateway over stub engines: thousands of mutated bodies and headers.

Hypothesis mutates valid chat and completion calls (fields replaced by any
JSON value, removed, or the bytes cut, spliced and mis-encoded) and raw
request heads, and sends them to one gateway over real stub engines, which
answer 200 to anything that reaches them. For every request: an answer comes
back on the connection (nothing is dropped) and it is not a 5xx, since no
pod fails; afterwards the gateway still serves and every in-flight and
queue gauge is back to zero.

Bounded for CI: a fixed number of examples, derandomized, no example
database, no deadline (timing on a busy machine is not what is tested).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgate.stub_engine import StubEngine
from tests.loopback.conftest import fast_settings
from tests.loopback.harness import Served, serve_gateway

BODY_EXAMPLES = 2000
HEAD_EXAMPLES = 800
_FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)

_PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
)
_json = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)
_FIELDS = (
    "model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n",
    "temperature", "top_p", "user", "chat_template_kwargs", "tools", "logprobs", "seed", "add_generation_prompt",
)  # fmt: skip
_good_values: dict[str, st.SearchStrategy] = {
    "model": st.sampled_from(["tiny-llama", "other-model", ""]),
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", ""]), "content": st.one_of(st.text(max_size=40), st.none())}
        ),
        max_size=4,
    ),
    "prompt": st.one_of(
        st.text(max_size=60),
        st.lists(st.integers(min_value=-5, max_value=2**64), max_size=8),
        st.lists(st.text(max_size=10), max_size=3),
    ),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(min_value=-2, max_value=2**40),
    "n": st.integers(min_value=-1, max_value=200),
    "user": st.text(max_size=12),
}


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    kind = draw(st.sampled_from(["chat", "completion"]))
    body: dict[str, Any] = {"model": "tiny-llama", "max_tokens": 2}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "hello"}]
    else:
        body["prompt"] = "hello"
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=4, unique=True)):
        action = draw(st.sampled_from(["good", "any", "drop"]))
        if action == "drop":
            body.pop(name, None)
        else:
            body[name] = draw(_good_values.get(name, _json) if action == "good" else _json)
    raw = json.dumps(body).encode()
    mutation = draw(st.sampled_from(["none", "none", "none", "truncate", "splice", "garbage"]))
    if mutation == "truncate":
        raw = raw[: draw(st.integers(min_value=0, max_value=len(raw)))]
    elif mutation == "splice":
        at = draw(st.integers(min_value=0, max_value=len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=12)) + raw[at:]
    elif mutation == "garbage":
        raw = draw(st.binary(max_size=64))
    headers: dict[str, str] = {"content-type": draw(st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))}
    encoding = draw(st.sampled_from([None, None, None, "gzip", "gzip-lie", "deflate", "identity", "br", "x"]))
    if encoding == "gzip":
        raw, headers["content-encoding"] = gzip.compress(raw), "gzip"
    elif encoding == "gzip-lie":
        headers["content-encoding"] = "gzip"
    elif encoding == "deflate":
        raw, headers["content-encoding"] = zlib.compress(raw), "deflate"
    elif encoding is not None:
        headers["content-encoding"] = encoding
    for name in draw(st.lists(st.sampled_from(["x-routing-strategy", "x-user-id", "x-session-id", "authorization"]), unique=True)):
        headers[name] = draw(
            st.one_of(st.sampled_from(["kv-aware", "round-robin", "random:1,least-request:2", "Bearer x"]), st.text(_PRINTABLE, max_size=30))
        )
    return ("/v1/chat/completions" if kind == "chat" else "/v1/completions"), raw, headers


#: Header values: any byte but CR, LF (and NUL), as latin-1 text.
_header_value = st.text(st.characters(min_codepoint=1, max_codepoint=255, exclude_characters="\r\n"), max_size=40)
_token = st.text(st.sampled_from("abcXYZ-_0123456789!#$%&'*+.^`|~"), min_size=1, max_size=12)


@st.composite
def _heads(draw: st.DrawFn) -> bytes:
    """A request head of printable bytes, sometimes malformed, and a small valid body."""
    body = b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}'
    method = draw(st.sampled_from(["POST", "GET", "PUT", "P0ST", "DELETE"]))
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/health", "/v1/models", "/x"]) | st.text(_PRINTABLE, max_size=20).map(lambda p: "/" + p.replace(" ", "")))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/x"]))
    lines = [f"{method} {path} {version}", "Host: gw"]
    length = draw(st.sampled_from(["right", "right", "none", "short", "text"]))
    if length == "right":
        lines.append(f"Content-Length: {len(body)}")
    elif length == "short":
        lines.append(f"Content-Length: {len(body) - 3}")
    elif length == "text":
        lines.append("Content-Length: " + draw(st.text(_PRINTABLE, min_size=1, max_size=6)))
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        name = draw(st.sampled_from(["Expect", "Transfer-Encoding", "Content-Encoding", "Connection", "X-Routing-Strategy", "Authorization"]) | _token)
        lines.append(f"{name}: {draw(st.one_of(st.text(_PRINTABLE, max_size=40), _header_value))}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _send(served: Served, path: str, raw: bytes, headers: dict[str, str]) -> tuple[int, str]:
    async with served.http.post(served.url + path, data=raw, headers=headers, skip_auto_headers=["Content-Type"]) as r:
        text = await r.text(errors="replace")
        return r.status, text


async def _send_head(served: Served, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*served.address)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=30)  # every head ends with Connection: close
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def _assert_settled(served: Served) -> None:
    gateway = served.gateway
    assert served.in_flight == 0
    assert all(p.in_flight == 0 for p in gateway.pods)
    registry = gateway.metrics.registry
    assert registry.get_sample_value("kvgate_admission_queue_length") == 0
    for pod in gateway.pods:
        assert (registry.get_sample_value("kvgate_pod_in_flight", {"pod": pod.id}) or 0) == 0


async def test_fuzzed_bodies_and_headers_get_answers_and_no_5xx():
    engines = [StubEngine(), StubEngine()]
    config = fast_settings()
    config.server.max_body_bytes = 64 * 1024
    async with serve_gateway(engines, config) as served:
        loop = asyncio.get_running_loop()
        statuses: dict[int, int] = {}

        @settings(_FUZZ, max_examples=BODY_EXAMPLES)
        @given(_bodies())
        def fuzz_bodies(case: tuple[str, bytes, dict[str, str]]) -> None:
            status, text = asyncio.run_coroutine_threadsafe(_send(served, *case), loop).result(timeout=60)
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (case, status, text)
            if status >= 400:
                assert "error" in json.loads(text), text

        @settings(_FUZZ, max_examples=HEAD_EXAMPLES)
        @given(_heads())
        def fuzz_heads(data: bytes) -> None:
            answer = asyncio.run_coroutine_threadsafe(_send_head(served, data), loop).result(timeout=60)
            assert answer.startswith(b"HTTP/"), (data, answer[:200])  # an answer, not a dropped connection
            status = int(answer.split(b" ", 2)[1])
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (data, answer[:400])

        await asyncio.to_thread(fuzz_bodies)
        await asyncio.to_thread(fuzz_heads)
        # Both kinds of outcome were reached: served calls and refused ones.
        assert statuses.get(200, 0) > 100 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 100, statuses
        async with served.http.get(served.url + "/health") as r:
            assert r.status == 200
        async with served.http.post(served.url + "/v1/completions", json={"model": "tiny-llama", "prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 200
        _assert_settled(served)
