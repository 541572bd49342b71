"""HTTP wiring of the gateway: routes, error rendering, drain bookkeeping.

`create_app(settings, discovery=..., encoder=...)` returns an aiohttp
application; `router.server` runs it. Every error leaves as OpenAI-shaped JSON
with its status, including aiohttp's own (404 unknown path, 405, 413 body too
large), and an unexpected exception is a logged 500, never a dead worker.
"""

from __future__ import annotations

import json
import logging
import random

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.dashboard import add_dashboard
from router.discovery import Discovery
from router.errors import GatewayError, PayloadTooLarge
from router.gateway import Gateway
from router.prompts import PromptEncoder
from router.settings import Settings

log = logging.getLogger(__name__)

GATEWAY = web.AppKey("gateway", Gateway)

#: How the app must be run: a client that hangs up cancels its handler, so a
#: request waiting in the queue leaves it, and a pod stops generating for it.
RUNNER_OPTIONS = {"handler_cancellation": True}
IN_FLIGHT = web.AppKey("in_flight", dict)


def _error_response(error: GatewayError) -> web.Response:
    headers = {"retry-after": "1"} if error.status in (429, 503) else None
    return web.Response(status=error.status, body=error.to_json(), content_type="application/json", headers=headers)


@web.middleware
async def _errors(request: web.Request, handler):  # noqa: ANN001, ANN202 - aiohttp's middleware protocol
    counter = request.app[IN_FLIGHT]
    counter["n"] += 1
    try:
        return await handler(request)
    except GatewayError as exc:
        return _error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return _error_response(PayloadTooLarge(f"request body too large: {exc.text or ''}".strip()))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = GatewayError(exc.reason or "error")
        payload = error.body()
        payload["error"]["type"] = "not_found_error" if exc.status == 404 else "invalid_request_error"
        payload["error"]["code"] = exc.status
        return web.Response(status=exc.status, body=json.dumps(payload).encode(), content_type="application/json")
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _error_response(GatewayError("internal error in the gateway"))
    finally:
        counter["n"] -= 1


async def _chat(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].complete("chat", request)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].complete("completion", request)


async def _models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    gateway.authenticate(request)
    return web.json_response({"object": "list", "data": gateway.models()})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    healthy = len(gateway.pods.healthy())
    body = {"ready": gateway.ready(), "draining": gateway.draining, "healthy_pods": healthy, "pods": len(gateway.pods)}
    return web.json_response(body, status=200 if gateway.ready() else 503)


async def _metrics(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[GATEWAY].metrics.registry)
    return web.Response(body=payload, headers={"content-type": CONTENT_TYPE_LATEST})


def create_app(
    settings: Settings,
    *,
    discovery: Discovery,
    encoder: PromptEncoder | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    """Wire a gateway into an aiohttp application.

    Args:
        settings: all settings.
        discovery: where pods come from.
        encoder: the model's tokenizer (bytes stand in when None).
        rng: randomness for tie-breaks (seed it in tests).

    Returns:
        The application; its start-up and clean-up start and stop the gateway.
    """
    gateway = Gateway(settings, discovery=discovery, encoder=encoder, rng=rng)
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[_errors])
    app[GATEWAY] = gateway
    app[IN_FLIGHT] = {"n": 0}
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    add_dashboard(app, gateway, interval_s=max(settings.scrape.interval_s, 0.5))

    async def _start(app: web.Application) -> None:
        await gateway.start()

    async def _stop(app: web.Application) -> None:
        await gateway.stop()

    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app
