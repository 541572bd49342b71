"""Pods that answer too much, too slowly or incompletely: bounded, cut off in time, reported.

A huge non-streamed answer fails that request with a 502 (without being read
whole); a stream is passed through as it comes, and an event without an end,
a silence or a stream without `data: [DONE]` ends it with an SSE error event,
counted in `kvgate_stream_errors`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web

from kvgate.stub_engine import StubEngine
from router.settings import UpstreamSettings
from tests.loopback.conftest import fast_settings
from tests.loopback.harness import serve_gateway

PROMPT = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4}
MiB = 1024 * 1024


@dataclass
class MisbehavingEngine(StubEngine):
    """A stub engine whose completions misbehave in one of a few ways (`mode`)."""

    mode: str = ""
    total_bytes: int = 64 * MiB
    sent: int = 0
    """Bytes the engine managed to hand to its socket."""
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "":
            return await super()._complete(request)
        await request.read()
        self.calls.append({"path": request.path})
        if self.mode == "hang":
            await self.release.wait()
            self.finished.set()
            return web.json_response({"choices": []})
        stream = self.mode not in ("huge-json", "error-then-silent")
        status = 400 if self.mode == "error-then-silent" else 200
        response = web.StreamResponse(status=status, headers={"content-type": "text/event-stream" if stream else "application/json"})
        try:
            await response.prepare(request)
            if self.mode == "huge-json":
                await self._pour(response, b'{"choices": [{"text": "' + b"a" * (64 * 1024))
            elif self.mode == "no-boundary":
                await self._pour(response, b"data: " + b"a" * (64 * 1024))
            elif self.mode == "no-done":
                await response.write(b'data: {"choices": [{"index": 0, "text": "tok "}]}\n\n')
            elif self.mode == "gated":
                await response.write(b'data: {"choices": [{"index": 0, "text": "first "}]}\n\n')
                await self.release.wait()
                await response.write(b'data: {"choices": [{"index": 0, "text": "last"}]}\n\ndata: [DONE]\n\n')
            elif self.mode == "error-then-silent":
                await response.write(b'{"error": {"message": "bad')
                await self.release.wait()
            elif self.mode == "silent":
                await response.write(b'data: {"choices": [{"index": 0, "text": "tok "}]}\n\n')
                await self.release.wait()
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.finished.set()
        return response

    async def _pour(self, response: web.StreamResponse, first: bytes) -> None:
        await response.write(first)
        self.sent = len(first)
        filler = b"a" * (64 * 1024)
        while self.sent < self.total_bytes:
            await response.write(filler)
            self.sent += len(filler)


def _settings(**upstream) -> object:
    settings = fast_settings()
    settings.upstream.retries = 0
    for name, value in upstream.items():
        setattr(settings.upstream, name, value)
    return settings


def _sample(served, name: str, pod: str) -> float:
    value = served.gateway.metrics.registry.get_sample_value(name, {"pod": pod})
    return value or 0.0


async def test_a_huge_answer_fails_with_502_without_being_read_whole():
    engine = MisbehavingEngine(mode="huge-json", total_bytes=64 * MiB)
    async with serve_gateway([engine], _settings(max_answer_bytes=1 * MiB)) as served:
        async with served.http.post(served.url + "/v1/completions", json=PROMPT) as r:
            body = await r.json()
        assert r.status == 502, body
        assert body["error"]["type"] == "upstream_too_large"
        await asyncio.wait_for(engine.finished.wait(), timeout=30)
        # The gateway stopped reading near the limit: what the pod could hand
        # over is the limit plus socket buffers, not the 64 MiB answer.
        assert engine.sent < 24 * MiB, engine.sent
        assert _sample(served, "kvgate_upstream_too_large_total", engine.url) == 1
        assert served.in_flight == 0 and all(p.in_flight == 0 for p in served.gateway.pods)


async def test_an_sse_event_without_an_end_fails_the_stream_and_is_not_buffered_whole():
    engine = MisbehavingEngine(mode="no-boundary", total_bytes=64 * MiB)
    async with serve_gateway([engine], _settings(max_event_bytes=1 * MiB)) as served:
        async with served.http.post(served.url + "/v1/completions", json={**PROMPT, "stream": True}) as r:
            assert r.status == 200
            text = (await r.read()).decode()
        events = [e for e in text.split("\n\n") if e]
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["type"] == "upstream_too_large"
        assert all(len(e) <= 1 * MiB for e in events)
        await asyncio.wait_for(engine.finished.wait(), timeout=30)
        assert engine.sent < 24 * MiB, engine.sent
        assert _sample(served, "kvgate_stream_errors_total", engine.url) == 1
        assert _sample(served, "kvgate_upstream_too_large_total", engine.url) == 1


async def test_stream_events_reach_the_client_before_the_pod_finishes():
    engine = MisbehavingEngine(mode="gated")
    async with serve_gateway([engine]) as served:
        async with served.http.post(served.url + "/v1/completions", json={**PROMPT, "stream": True}) as r:
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), timeout=10)
            assert b"first" in first and not engine.finished.is_set()
            engine.release.set()
            rest = await r.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert _sample(served, "kvgate_stream_errors_total", engine.url) == 0


async def test_a_stream_ending_without_done_gets_an_error_event_and_is_counted():
    engine = MisbehavingEngine(mode="no-done")
    async with serve_gateway([engine]) as served:
        async with served.http.post(served.url + "/v1/completions", json={**PROMPT, "stream": True}) as r:
            assert r.status == 200
            text = (await r.read()).decode()
        events = [e for e in text.split("\n\n") if e]
        assert "tok" in events[0]
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert "[DONE]" in error["message"] and error["code"] == 502
        assert _sample(served, "kvgate_stream_errors_total", engine.url) == 1


async def test_a_stream_gone_silent_is_cut_after_the_read_timeout():
    engine = MisbehavingEngine(mode="silent")
    async with serve_gateway([engine], _settings(read_timeout_s=0.3)) as served:
        async with served.http.post(served.url + "/v1/completions", json={**PROMPT, "stream": True}) as r:
            text = (await asyncio.wait_for(r.read(), timeout=10)).decode()
        error = json.loads([e for e in text.split("\n\n") if e][-1].removeprefix("data: "))["error"]
        assert error["type"] == "upstream_timeout"
        assert _sample(served, "kvgate_stream_errors_total", engine.url) == 1
        engine.release.set()
        await asyncio.wait_for(engine.finished.wait(), timeout=10)


async def test_an_error_answer_to_a_stream_call_that_goes_silent_is_cut_off():
    engine = MisbehavingEngine(mode="error-then-silent")
    async with serve_gateway([engine], _settings(read_timeout_s=0.3)) as served:
        async with served.http.post(served.url + "/v1/completions", json={**PROMPT, "stream": True}) as r:
            body = await asyncio.wait_for(r.json(), timeout=10)
        assert r.status == 504 and body["error"]["type"] == "upstream_timeout"
        engine.release.set()
        await asyncio.wait_for(engine.finished.wait(), timeout=10)


async def test_a_hung_pod_fails_a_short_non_streamed_call_by_its_budget():
    engine = MisbehavingEngine(mode="hang")
    settings = _settings(first_byte_timeout_s=0.3, min_decode_tokens_per_s=40.0, max_answer_s=20.0)
    async with serve_gateway([engine], settings) as served:
        async with served.http.post(served.url + "/v1/completions", json=PROMPT) as r:  # budget 0.3 + 4/40 s
            body = await asyncio.wait_for(r.json(), timeout=10)
        assert r.status == 504 and body["error"]["type"] == "upstream_timeout"
        engine.release.set()
        await asyncio.wait_for(engine.finished.wait(), timeout=10)


def test_default_upstream_timeouts_bound_what_a_hung_pod_costs():
    from router.proxy import Proxy

    defaults = UpstreamSettings()
    proxy = Proxy(None, defaults)  # type: ignore[arg-type] - only the budget is asked
    assert defaults.first_byte_timeout_s <= 60 and defaults.read_timeout_s <= 30
    assert proxy.answer_budget_s(16) <= 65
    assert proxy.answer_budget_s(1024) <= 200
    assert proxy.answer_budget_s(None) == defaults.max_answer_s
    assert proxy.answer_budget_s(10**6) == defaults.max_answer_s
