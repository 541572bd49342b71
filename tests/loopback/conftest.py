"""Loopback fixtures: stub engines and a gateway, all real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from router.app import GATEWAY, create_app
from router.connections import serving
from router.discovery import StaticDiscovery
from router.gateway import Gateway
from router.settings import Settings
from kvgate.stub_engine import StubEngine, run_stub
from tests.support.kvcache_servers import RedisServer


@dataclass
class Cluster:
    url: str
    gateway: Gateway
    engines: list[StubEngine]
    http: aiohttp.ClientSession

    async def post(self, path: str, payload=None, *, data=None, headers=None) -> aiohttp.ClientResponse:
        return await self.http.post(self.url + path, json=payload, data=data, headers=headers)

    def engine_at(self, pod_url: str) -> StubEngine:
        return next(e for e in self.engines if e.url == pod_url)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def fast_settings(**admission) -> Settings:
    settings = Settings()
    settings.discovery.health_interval_s = 0.05
    settings.discovery.probe_timeout_s = 0.5
    settings.scrape.interval_s = 0.05
    settings.server.drain_grace_s = 5.0
    for name, value in admission.items():
        setattr(settings.admission, name, value)
    return settings


@contextlib.asynccontextmanager
async def start_cluster(n: int = 2, settings: Settings | None = None, **engine_kwargs) -> AsyncIterator[Cluster]:
    settings = settings or fast_settings()
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(run_stub(StubEngine(**engine_kwargs))) for _ in range(n)]
        app = create_app(settings, discovery=StaticDiscovery([e.url for e in engines]), rng=random.Random(7))
        url = await stack.enter_async_context(serving(app, settings.server, metrics=app[GATEWAY].metrics))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateway = app[GATEWAY]
        await wait_until(lambda: len(gateway.pods.healthy()) == n and all(p.models for p in gateway.pods))
        yield Cluster(url, gateway, engines, http)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with start_cluster() as c:
        yield c


def heard_each_other(before: list[tuple[float, float]], now: list[tuple[float, float]]) -> bool:
    """Whether every state event each replica sent since `before` has reached each of the others.

    Both lists hold (sent, received) event counts per replica, in one order.
    """
    sent = [s - b[0] for (s, _), b in zip(now, before)]
    return all(r - b[1] >= sum(sent) - mine for (_, r), b, mine in zip(now, before, sent))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server on a free port, for tests that kill and restart their store."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
