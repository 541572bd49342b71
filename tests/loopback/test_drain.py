"""`kvgate serve` as a real process: SIGTERM fails /ready, lets streams finish, exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp

from kvgate.stub_engine import StubEngine, run_stub


async def _start_gateway(worker_url: str, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvgate", "serve", "--worker-urls", worker_url, "--port", "0", "--drain-grace", "10", *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
    assert line.startswith("gateway: http://"), line
    return proc, line.split(" ", 1)[1].strip()


async def _wait_ready(http: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        async with http.get(url + "/ready") as r:
            if r.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("gateway never became ready")


async def _wait_draining(http: aiohttp.ClientSession, url: str) -> dict:
    """Poll /ready until the gateway says it is draining; returns its last answer."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with http.get(url + "/ready") as r:
            body = await r.json()
            if r.status == 503 and body.get("draining"):
                return body
        assert asyncio.get_running_loop().time() < deadline, "the gateway never started draining"
        await asyncio.sleep(0.02)


async def test_sigterm_drains_in_flight_streams_then_exits_zero():
    engine = StubEngine()
    engine.behaviour.tokens = 8
    engine.behaviour.chunk_delay_s = 0.15
    async with run_stub(engine), aiohttp.ClientSession() as http:
        proc, url = await _start_gateway(engine.url)
        try:
            await _wait_ready(http, url)
            payload = {"model": "tiny-llama", "prompt": "drain me", "max_tokens": 8, "stream": True}
            async with http.post(url + "/v1/completions", json=payload) as r:
                assert r.status == 200
                first = await r.content.readuntil(b"\n\n")
                proc.send_signal(signal.SIGTERM)
                assert (await _wait_draining(http, url))["draining"] is True
                rest = await r.read()
            events = (first + rest).decode().split("\n\n")
            assert sum(e.startswith("data: {") for e in events) == 8  # every token arrived
            assert "data: [DONE]" in events
            assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_sigterm_with_nothing_in_flight_exits_at_once():
    engine = StubEngine()
    async with run_stub(engine), aiohttp.ClientSession() as http:
        proc, url = await _start_gateway(engine.url)
        try:
            await _wait_ready(http, url)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), timeout=5) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
