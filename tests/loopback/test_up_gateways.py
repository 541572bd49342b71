"""`kvgate up --gateways N`'s replicas (`kvgate.gateways`) over stub engines: one `gateway:` line each, shared state.

The replicas run in-process as `kvgate up` runs them; the store is a private
redis-server. Without a Redis they still serve, after one warning line.
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
import redis

from kvgate.engines import free_port, kv_events_args
from kvgate.gateways import engine_events_host, event_source, replica_settings, serve_replicas, state_url_for
from kvgate.stub_engine import StubEngine, run_stub
from router.discovery import StaticDiscovery
from tests.loopback.conftest import fast_settings, heard_each_other


async def _gateway_urls(capsys, count: int, timeout: float = 10.0) -> list[str]:
    seen = ""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(re.findall(r"^gateway: ", seen, re.M)) < count:
        assert asyncio.get_running_loop().time() < deadline, seen
        await asyncio.sleep(0.02)
        seen += capsys.readouterr().out
    return re.findall(r"^gateway: (\S+)$", seen, re.M)


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> float | None:
    async with http.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


async def _state_events(http: aiohttp.ClientSession, urls: list[str]) -> list[tuple[float, float]]:
    """(sent, received) state events per replica."""
    counts = []
    for url in urls:
        async with http.get(url + "/metrics") as r:
            text = await r.text()
        sent = re.search(r'^kvgate_state_events_total\{direction="sent"\} (\S+)$', text, re.M)
        received = re.search(r'^kvgate_state_events_total\{direction="received"\} (\S+)$', text, re.M)
        counts.append((float(sent[1]) if sent else 0.0, float(received[1]) if received else 0.0))
    return counts


async def _heard(http: aiohttp.ClientSession, urls: list[str], before: list[tuple[float, float]]) -> None:
    """Wait until every event a replica sent since `before` has reached each of the others."""
    for _ in range(200):
        now = await _state_events(http, urls)
        if heard_each_other(before, now):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the replicas did not hear each other: {before} -> {now}")


async def test_replicas_print_a_line_each_and_share_routing_state(redis_server, capsys):  # noqa: F811
    async with run_stub(StubEngine()) as e0, run_stub(StubEngine()) as e1:
        settings = fast_settings()
        settings.discovery.worker_urls = (e0.url, e1.url)
        settings.server.port = 0
        stop = asyncio.Event()
        serving = asyncio.create_task(
            serve_replicas(
                settings,
                3,
                redis_url=redis_server.url,
                discovery=lambda: StaticDiscovery(settings.discovery.worker_urls),
                encoder=None,
                stop=stop,
            )
        )
        try:
            urls = await _gateway_urls(capsys, 3)
            assert len(set(urls)) == 3
            async with aiohttp.ClientSession() as http:
                for url in urls:
                    for _ in range(200):
                        async with http.get(url + "/ready") as r:
                            if r.status == 200:
                                break
                        await asyncio.sleep(0.05)
                    assert await _metric(http, url, "kvgate_state_store_up") == 1.0
                system = "Shared house rules for every replica, followed to the letter. " * 20
                pods = set()
                for i in range(6):
                    # The stub answers at once; the replicas are in this process, so the next
                    # request can beat the peers' read of the release (one stream delivery).
                    before = await _state_events(http, urls)
                    payload = {"model": "tiny-llama", "max_tokens": 2,
                               "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]}  # fmt: skip
                    async with http.post(urls[i % 3] + "/v1/chat/completions", json=payload) as r:
                        assert r.status == 200, await r.text()
                        pods.add(r.headers["x-kvgate-pod"])
                    await _heard(http, urls, before)
                assert len(pods) == 1, "the replicas route a shared prefix as one gateway"
                for url in urls:
                    assert await _metric(http, url, "kvgate_state_peers") == 2.0
        finally:
            stop.set()
            assert await asyncio.wait_for(serving, timeout=30) == 0
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.keys("kvgate:*") == [], "the replicas' keys are gone once they stopped"
    finally:
        client.close()


def test_without_a_redis_replicas_run_alone_after_one_warning():
    lines: list[str] = []
    closed = f"redis://127.0.0.1:{free_port()}/0"

    assert state_url_for(closed, 3, warn=lines.append) is None
    assert len(lines) == 1 and "without shared state" in lines[0] and closed in lines[0]
    assert state_url_for(closed, 1, warn=lines.append) is None and len(lines) == 1, "one gateway needs no store"


@pytest.mark.parametrize(
    ("port", "index", "expected"),
    [
        pytest.param(8000, 0, 8000, id="first-on-the-port"),
        pytest.param(8000, 2, 8002, id="the-ones-after"),
        pytest.param(0, 2, 0, id="free-ports"),
    ],
)
def test_replica_ports_and_state(port, index, expected):
    base = fast_settings()
    base.server.port = port

    settings = replica_settings(base, index, state_url="redis://h:1/0", cluster="up-1")

    assert settings.server.port == expected and base.server.port == port
    assert (settings.state.url, settings.state.cluster) == ("redis://h:1/0", "up-1")


@pytest.mark.parametrize(
    ("gateways", "engine_endpoint", "gateway_side"),
    [
        pytest.param(1, "tcp://127.0.0.1:5555", "listen:tcp://127.0.0.1:5555", id="one-gateway-listens"),
        pytest.param(3, "tcp://*:5555", "tcp://127.0.0.1:5555", id="replicas-connect-to-the-engine"),
    ],
)
def test_every_replica_can_follow_the_engines_kv_events(gateways, engine_endpoint, gateway_side):
    args = kv_events_args(5555, topic="t", host=engine_events_host(gateways))

    assert json.loads(args[1])["endpoint"] == engine_endpoint
    assert event_source(args, gateways) == gateway_side
    assert event_source((), gateways) is None
