"""The gateway's live dashboard: ``GET /dashboard`` (one self-contained page) and ``GET /dashboard/data``.

`add_dashboard(app, gateway)` adds both routes and a `Sampler` that records
the gateway's figures while the app runs. The page (``page.html``, a package
resource) has no external assets: it draws its charts as inline SVG and
polls the data endpoint, so it works on machines with no internet access.

Not here: Grafana dashboards (`kvgate.dashboards`), which read Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources

from aiohttp import web

from router.dashboard.data import snapshot
from router.dashboard.samples import Sampler
from router.gateway import Gateway

SAMPLER = web.AppKey("dashboard_sampler", Sampler)
_TASK = web.AppKey("dashboard_task", asyncio.Task)


def page() -> bytes:
    """The page's HTML (read from the package)."""
    return resources.files(__package__).joinpath("page.html").read_bytes()


def add_dashboard(app: web.Application, gateway: Gateway, *, interval_s: float = 1.0, window_s: float = 300.0) -> None:
    """Serve the live page from `app` and sample `gateway` while it runs.

    Args:
        app: the gateway's application (routes and start-up/clean-up hooks are added).
        gateway: whose figures to show.
        interval_s: seconds between samples (and between the page's polls).
        window_s: seconds of history the charts show.
    """
    sampler = Sampler(gateway, interval_s, window_s)
    app[SAMPLER] = sampler
    html = page()

    async def _page(request: web.Request) -> web.Response:
        return web.Response(body=html, content_type="text/html", charset="utf-8", headers={"cache-control": "no-cache"})

    async def _data(request: web.Request) -> web.Response:
        return web.json_response(snapshot(gateway, sampler.samples, sampler.interval_s), headers={"cache-control": "no-store"})

    async def _start(app: web.Application) -> None:
        app[_TASK] = asyncio.create_task(sampler.run(), name="dashboard sampler")

    async def _stop(app: web.Application) -> None:
        task = app.get(_TASK)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.router.add_get("/dashboard", _page)
    app.router.add_get("/dashboard/data", _data)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
