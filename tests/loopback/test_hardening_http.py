"""Malformed, hostile and slow clients get OpenAI-shaped 4xx answers and are cut off in time.

Bodies that once crashed a handler (deep nesting, huge integers, token ids
past int64, lone surrogates, a body that is not what its Content-Encoding
says), requests aiohttp's own parser refuses, and clients that trickle their
headers or body one byte at a time, or open too many connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json

import pytest

from kvgate.stub_engine import StubEngine
from tests.loopback.conftest import fast_settings, start_cluster
from tests.loopback.harness import serve_gateway

GOOD = b'{"model": "tiny-llama", "prompt": "hello", "max_tokens": 2}'


def _request(body: bytes, *, path: str = "/v1/completions", extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.x response with a Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout=10)
    return status, headers, body


async def _exchange(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()


def _assert_openai_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    payload = json.loads(body)
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"]
    return payload["error"]


_BODY_CASES = [
    pytest.param(b'{"model": "tiny-llama", "prompt": "a", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", "", id="nested-1000-deep"),
    pytest.param(b'{"model": "tiny-llama", "prompt": "a", "stream": true, "x": ' + b"[" * 900 + b"]" * 900 + b"}", "", id="nested-900-deep-stream"),
    pytest.param(b'{"model": "tiny-llama", "prompt": "a", "seed": ' + b"7" * 4301 + b"}", "", id="integer-4301-digits"),
    pytest.param(b'{"model": "tiny-llama", "prompt": [1, ' + str(2**63).encode() + b"]}", "", id="token-id-2^63"),
    pytest.param(b'{"model": "tiny-llama", "prompt": [[5, ' + str(2**64).encode() + b"]]}", "", id="token-id-2^64-in-batch"),
    pytest.param(b'{"model": "tiny-llama", "prompt": "a\\ud800b"}', "", id="lone-surrogate-prompt"),
    pytest.param(b'{"model": "tiny-llama", "prompt": "a", "user": "\\udfff"}', "", id="lone-surrogate-user"),
    pytest.param(b'{"model": "tiny-llama", "prompt": "a\xed\xa0\x80"}', "", id="raw-utf8-surrogate"),
    pytest.param(
        b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "a\\ud800"}]}', "chat", id="lone-surrogate-chat"
    ),
    pytest.param('{"model": "tiny-llama", "prompt": "a"}'.encode("utf-16"), "", id="utf16-json"),
    pytest.param(
        b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": [1]}',
        "chat",
        id="chat-template-kwargs-not-object",
    ),
]


@pytest.mark.parametrize(("body", "kind"), _BODY_CASES)
async def test_bodies_that_crashed_handlers_are_400(cluster, body, kind):
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    status, headers, answer = await _exchange(cluster.url, _request(body, path=path))
    _assert_openai_error(status, headers, answer, 400)
    assert all(not e.calls for e in cluster.engines)
    assert all(p.in_flight == 0 for p in cluster.gateway.pods)


async def test_a_valid_surrogate_pair_is_text_and_served(cluster):
    body = b'{"model": "tiny-llama", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    status, _, _ = await _exchange(cluster.url, _request(body))
    assert status == 200


async def test_gzip_header_on_a_plain_body_is_400_and_keeps_the_connection(cluster):
    host, port = cluster.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(_request(GOOD, extra=b"Content-Encoding: gzip\r\n"))
        status, headers, answer = await _read_response(reader)
        _assert_openai_error(status, headers, answer, 400)
        assert headers.get("connection", "").lower() != "close"
        writer.write(_request(GOOD))  # the same connection serves the next request
        status, _, answer = await _read_response(reader)
        assert status == 200, answer
    finally:
        writer.close()
        await writer.wait_closed()


async def test_gzip_and_deflate_bodies_are_decoded(cluster):
    import zlib

    for encoding, data in (("gzip", gzip.compress(GOOD)), ("deflate", zlib.compress(GOOD))):
        status, _, answer = await _exchange(cluster.url, _request(data, extra=f"Content-Encoding: {encoding}\r\n".encode()))
        assert status == 200, (encoding, answer)


async def test_a_compressed_bomb_is_413():
    settings = fast_settings()
    settings.server.max_body_bytes = 64 * 1024
    async with start_cluster(1, settings) as cluster:
        bomb = gzip.compress(b'{"model": "tiny-llama", "prompt": "' + b"a" * 1_000_000 + b'"}')
        assert len(bomb) < settings.server.max_body_bytes
        status, headers, answer = await _exchange(cluster.url, _request(bomb, extra=b"Content-Encoding: gzip\r\n"))
        _assert_openai_error(status, headers, answer, 413)


_PARSER_CASES = [
    pytest.param(_request(GOOD, extra=b"Content-Encoding: br\r\n"), 415, id="unknown-content-encoding"),
    pytest.param(_request(GOOD, extra=b"X-Big: " + b"a" * 9000 + b"\r\n"), 431, id="header-too-large"),
    pytest.param(_request(GOOD, extra=b"".join(b"X-H%d: a\r\n" % i for i in range(200))), 431, id="too-many-headers"),
    pytest.param(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n\r\n{}", 400, id="bad-content-length"),
    pytest.param(_request(GOOD, extra=b"Expect: the-impossible\r\n"), 417, id="unknown-expect"),
    pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 431, id="request-line-too-long"),
    pytest.param(b"P@ST /v1/completions HTTP/1.1\r\nHost: gw\r\n\r\n", 400, id="bad-method"),
    pytest.param(
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400, id="bad-chunk-size"
    ),
]


@pytest.mark.parametrize(("data", "status"), _PARSER_CASES)
async def test_what_the_http_parser_refuses_is_answered_as_openai_json(cluster, data, status):
    got, headers, answer = await _exchange(cluster.url, data)
    _assert_openai_error(got, headers, answer, status)
    async with await cluster.post("/v1/completions", json.loads(GOOD)) as r:
        assert r.status == 200


async def test_expect_100_continue_is_honoured(cluster):
    async with cluster.http.post(cluster.url + "/v1/completions", data=GOOD, expect100=True) as r:
        assert r.status == 200


# Slow clients ---------------------------------------------------------------


def _cutoffs(gateway, reason: str) -> float:
    return gateway.metrics.registry.get_sample_value("kvgate_client_cutoffs_total", {"reason": reason}) or 0.0


def _slow_settings(**server):
    settings = fast_settings()
    for name, value in server.items():
        setattr(settings.server, name, value)
    return settings


async def _trickle(url: str, data: bytes, interval_s: float = 0.05) -> tuple[int, bytes]:
    """Send `data` one byte per `interval_s` until the gateway closes; returns (bytes sent, what came back)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = asyncio.create_task(reader.read())  # done when the gateway closes
    sent = 0
    try:
        for i in range(len(data)):
            if answer.done():
                break
            try:
                writer.write(data[i : i + 1])
                await writer.drain()
            except ConnectionError:
                break
            sent += 1
            await asyncio.sleep(interval_s)  # the client's pace, not a wait for the gateway
        try:
            return sent, await asyncio.wait_for(answer, timeout=10)
        except ConnectionError:
            return sent, b""
    finally:
        answer.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_headers_sent_one_byte_at_a_time_are_cut_off():
    settings = _slow_settings(header_timeout_s=0.5)
    async with start_cluster(1, settings) as cluster:
        head = _request(GOOD)[:-len(GOOD)]  # 100+ bytes: 5+ s at this pace
        results = await asyncio.gather(*(_trickle(cluster.url, head) for _ in range(20)))
        for sent, answer in results:
            assert sent < len(head) // 2, "a trickling client kept its connection"
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b'"type": "request_timeout"' in answer
        assert _cutoffs(cluster.gateway, "header_timeout") == 20
        async with await cluster.post("/v1/completions", json.loads(GOOD)) as r:
            assert r.status == 200


async def test_a_body_sent_one_byte_at_a_time_gets_408_and_is_not_in_flight():
    settings = _slow_settings(body_timeout_s=0.5)
    async with serve_gateway([StubEngine()], settings) as cluster:
        body = b'{"model": "tiny-llama", "prompt": "' + b"a" * 200 + b'"}'
        data = _request(body)
        head = data[: -len(body)]
        reader, writer = await asyncio.open_connection(*cluster.address)
        try:
            writer.write(head)
            sent = 0
            answer = asyncio.create_task(_read_response(reader))
            for byte in body:
                if answer.done():
                    break
                assert cluster.in_flight == 0  # a body still arriving is not in flight
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)
            status, headers, text = await answer
            _assert_openai_error(status, headers, text, 408)
            assert headers.get("connection", "").lower() == "close"
            assert sent < len(body) // 2
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert cluster.in_flight == 0
        assert not cluster.engines[0].calls
        assert _cutoffs(cluster.gateway, "body_timeout") == 1


async def test_idle_connections_are_closed_after_the_keepalive_timeout():
    settings = _slow_settings(keepalive_timeout_s=0.5)
    async with start_cluster(1, settings) as cluster:
        host, port = cluster.url.removeprefix("http://").split(":")
        silent_reader, silent_writer = await asyncio.open_connection(host, int(port))
        used_reader, used_writer = await asyncio.open_connection(host, int(port))
        try:
            used_writer.write(_request(GOOD))
            status, _, _ = await _read_response(used_reader)
            assert status == 200
            # Both are closed by the gateway: never sent anything / idle after an answer.
            assert await asyncio.wait_for(silent_reader.read(), timeout=10) == b""
            assert await asyncio.wait_for(used_reader.read(), timeout=10) == b""
        finally:
            for w in (silent_writer, used_writer):
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()


async def test_connections_beyond_the_limit_get_503_and_are_closed():
    settings = _slow_settings(max_connections=4)
    async with start_cluster(1, settings) as cluster:
        host, port = cluster.url.removeprefix("http://").split(":")
        held = []
        try:
            for _ in range(4):
                held.append(await asyncio.open_connection(host, int(port)))
            reader, writer = await asyncio.open_connection(host, int(port))
            held.append((reader, writer))
            status, headers, text = await _read_response(reader)
            _assert_openai_error(status, headers, text, 503)
            assert headers["retry-after"] == "1" and headers["connection"].lower() == "close"
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""
            assert _cutoffs(cluster.gateway, "connection_limit") == 1
            # The held ones still work, and a freed slot is used again.
            held[0][1].write(_request(GOOD))
            status, _, _ = await _read_response(held[0][0])
            assert status == 200
        finally:
            for _, w in held:
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()
        async def served() -> bool:
            async with await cluster.post("/v1/completions", json.loads(GOOD)) as r:
                return r.status == 200

        for _ in range(100):
            if await served():
                break
        else:
            raise AssertionError("the gateway never accepted a connection again")


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/nowhere"])
@pytest.mark.parametrize("value", [b"the-impossible", b"caf\xff"])
async def test_an_unknown_expect_is_417_on_every_path(cluster, path, value):
    data = f"GET {path} HTTP/1.1\r\nHost: gw\r\n".encode() + b"Expect: " + value + b"\r\n\r\n"
    status, headers, answer = await _exchange(cluster.url, data)
    _assert_openai_error(status, headers, answer, 417)


async def test_expect_100_continue_with_a_body_over_the_limit_is_413_before_the_body():
    settings = fast_settings()
    settings.server.max_body_bytes = 1024
    async with start_cluster(1, settings) as cluster:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        status, headers, answer = await _exchange(cluster.url, head)  # no body is sent
        _assert_openai_error(status, headers, answer, 413)
