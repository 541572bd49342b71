"""A stub engine whose answers a test switches at will: bad shapes, error statuses, hangs.

`FaultyPod` serves a `StubEngine` (a real aiohttp server on 127.0.0.1 port 0)
behind a middleware: while `pod.answers[path]` holds an `Answer`, that path
answers it instead of the engine; delete the entry and the engine answers
again. `pod.hits[path]` counts requests per path, so tests can wait until a
bad answer has really been served. The metrics page counts as `/metrics` at
either of its paths.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from kvgate.stub_engine import StubEngine, run_app


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    hang: bool = False
    """Never answer (until the pod is stopped)."""


@dataclass
class FaultyPod:
    engine: StubEngine = field(default_factory=StubEngine)
    answers: dict[str, Answer] = field(default_factory=dict)
    hits: collections.Counter = field(default_factory=collections.Counter)
    url: str = ""
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = self.engine.app()
        app.middlewares.append(self._middleware)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):  # noqa: ANN001, ANN202 - aiohttp's protocol
        # The metrics page is one page at either path (the restricted one is /metrics/?name[]=...).
        path = "/metrics" if request.path == "/metrics/" else request.path
        self.hits[path] += 1
        answer = self.answers.get(path)
        if answer is None:
            return await handler(request)
        if answer.hang:
            await self._stopping.wait()
        return web.Response(status=answer.status, body=answer.body, headers={"content-type": answer.content_type})

    async def served(self, path: str, times: int = 1, timeout: float = 5.0) -> None:
        """Wait until `path` has been requested `times` more times."""
        target = self.hits[path] + times
        deadline = asyncio.get_running_loop().time() + timeout
        while self.hits[path] < target:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{path} was not requested {times} more times in {timeout}s")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def run_faulty(pod: FaultyPod) -> AsyncIterator[FaultyPod]:
    async with run_app(pod.app()) as url:
        pod.url = pod.engine.url = url
        try:
            yield pod
        finally:
            pod._stopping.set()  # let hanging handlers finish so the server stops at once
