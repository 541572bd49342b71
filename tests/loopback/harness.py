"""A gateway over given stub engines, served as `kvgate serve` serves it, with its app at hand."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from kvgate.stub_engine import StubEngine, run_stub
from router.app import GATEWAY, IN_FLIGHT, create_app
from router.connections import serving
from router.discovery import StaticDiscovery
from router.gateway import Gateway
from router.settings import Settings
from tests.loopback.conftest import fast_settings, wait_until


@dataclass
class Served:
    url: str
    app: web.Application
    engines: Sequence[StubEngine]
    http: aiohttp.ClientSession

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def in_flight(self) -> int:
        """Requests the app counts in flight (what a drain waits for)."""
        return self.app[IN_FLIGHT]["n"]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


@contextlib.asynccontextmanager
async def serve_gateway(engines: Sequence[StubEngine], settings: Settings | None = None) -> AsyncIterator[Served]:
    settings = settings or fast_settings()
    async with contextlib.AsyncExitStack() as stack:
        for engine in engines:
            await stack.enter_async_context(run_stub(engine))
        app = create_app(settings, discovery=StaticDiscovery([e.url for e in engines]), rng=random.Random(7))
        url = await stack.enter_async_context(serving(app, settings.server, metrics=app[GATEWAY].metrics))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        served = Served(url, app, engines, http)
        await wait_until(lambda: len(served.gateway.pods.healthy()) == len(engines) and all(p.models for p in served.gateway.pods))
        yield served
