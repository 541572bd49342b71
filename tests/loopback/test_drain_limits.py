"""A drain refuses new calls, lets in-flight ones finish, is not held by a stalled body, and ends within its grace."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp

from kvgate.stub_engine import StubEngine, run_stub
from router.discovery import StaticDiscovery
from router.server import serve
from tests.loopback.conftest import fast_settings

PROMPT = {"model": "tiny-llama", "prompt": "drain me", "max_tokens": 4}


@contextlib.asynccontextmanager
async def _serving(engine: StubEngine, grace_s: float):
    """`router.server.serve` in this process; yields (url, stop event, serve task)."""
    settings = fast_settings()
    settings.server.port = 0
    settings.server.drain_grace_s = grace_s
    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(settings, discovery=StaticDiscovery([engine.url]), on_listening=listening.set_result, stop=stop)
    )
    try:
        url = await asyncio.wait_for(listening, timeout=30)
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                async with http.get(url + "/ready") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.025)
            else:
                raise AssertionError("gateway never became ready")
        yield url, stop, task
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=2 * grace_s + 5)
        if not task.done():
            task.cancel()


async def test_new_calls_during_a_drain_get_503_while_in_flight_streams_finish():
    engine = StubEngine()
    engine.behaviour.tokens = 6
    engine.behaviour.chunk_delay_s = 0.1
    async with run_stub(engine), _serving(engine, grace_s=10) as (url, stop, task):
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions", json={**PROMPT, "max_tokens": 6, "stream": True}) as stream:
                first = await stream.content.readuntil(b"\n\n")
                stop.set()
                async with aiohttp.ClientSession() as other:
                    for _ in range(200):  # until the drain has begun
                        async with other.get(url + "/ready") as r:
                            if r.status == 503:
                                break
                    async with other.post(url + "/v1/completions", json=PROMPT) as r:
                        body = await r.json()
                        assert r.status == 503, body
                        assert body["error"]["type"] == "service_unavailable"
                        assert r.headers["retry-after"] == "1"
                        assert r.headers["connection"].lower() == "close"
                rest = await stream.read()
        events = [e for e in (first + rest).decode().split("\n\n") if e]
        assert sum(e.startswith("data: {") for e in events) == 6 and events[-1] == "data: [DONE]"
        assert await asyncio.wait_for(task, timeout=10) == 0
    assert len(engine.calls) == 1


async def test_the_drain_ends_within_its_grace_not_twice_it():
    engine = StubEngine()
    engine.behaviour.tokens = 10_000
    engine.behaviour.chunk_delay_s = 0.2  # a stream far longer than the grace
    grace = 2.0
    async with run_stub(engine), _serving(engine, grace_s=grace) as (url, stop, task):
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions", json={**PROMPT, "max_tokens": 10_000, "stream": True}) as stream:
                await stream.content.readuntil(b"\n\n")
                began = time.monotonic()
                stop.set()
                assert await asyncio.wait_for(asyncio.shield(task), timeout=4 * grace) == 0
                took = time.monotonic() - began
        assert took < grace + 0.75, f"drain took {took:.2f} s for a grace of {grace} s"


async def test_a_stalled_body_does_not_hold_the_drain():
    engine = StubEngine()
    async with run_stub(engine), _serving(engine, grace_s=8.0) as (url, stop, task):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            await writer.drain()
            async with aiohttp.ClientSession() as http, http.get(url + "/health") as r:
                assert r.status == 200  # the stalled request's head has been read by now
            began = time.monotonic()
            stop.set()
            assert await asyncio.wait_for(asyncio.shield(task), timeout=20) == 0
            took = time.monotonic() - began
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert took < 4.0, f"a stalled body held the drain for {took:.2f} s"
