"""HTTP wiring of the gateway: routes, error rendering, drain bookkeeping.

`create_app(settings, discovery=..., encoder=...)` returns an aiohttp
application; `router.server` runs it on `router.connections.GatewayRunner`.
Every error leaves as OpenAI-shaped JSON with its status, including aiohttp's
own (404 unknown path, 405, 413 body too large, 417 unknown `Expect`), and an
unexpected exception is a logged 500, never a dead worker.

A POST body is read whole (`router.body`: deadline, size, decoding) before
the request counts as in flight, so only requests that can be served hold a
drain. While draining, new API calls answer 503 with `Connection: close`.
"""

from __future__ import annotations

import json
import logging
import random

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.body import read_body
from router.dashboard import add_dashboard
from router.discovery import Discovery
from router.errors import GatewayError, NoCapacity, PayloadTooLarge
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


def _refuse_when_draining(request: web.Request) -> None:
    if request.app[GATEWAY].draining and request.path.startswith("/v1/"):
        raise NoCapacity("the gateway is shutting down; retry on another replica")


@web.middleware
async def _errors(request: web.Request, handler):  # noqa: ANN001, ANN202 - aiohttp's middleware protocol
    counter = request.app[IN_FLIGHT]
    counted = False
    try:
        _refuse_when_draining(request)
        if request.method == "POST" and request.can_read_body:
            server = request.app[GATEWAY].settings.server
            await read_body(request, max_bytes=server.max_body_bytes, timeout_s=server.body_timeout_s)
        counter["n"] += 1
        counted = True
        response = await handler(request)
        if request.app[GATEWAY].draining and not response.prepared:
            response.force_close()  # the client should take its next request elsewhere
        return response
    except GatewayError as exc:
        response = _error_response(exc)
        if exc.status == 408:
            request.app[GATEWAY].metrics.client_cutoffs.labels("body_timeout").inc()
        if exc.status == 408 or request.app[GATEWAY].draining:
            response.force_close()  # the rest of the body is not worth waiting for; a drain ends connections
        return response
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
        if counted:
            counter["n"] -= 1


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` on an API call: refused early when draining or too large, else "go on".

    Other expectations are refused before routing (`router.connections`).
    """
    if request.app[GATEWAY].draining:
        response = _error_response(NoCapacity("the gateway is shutting down; retry on another replica"))
    elif (request.content_length or 0) > request.app[GATEWAY].settings.server.max_body_bytes:
        response = _error_response(PayloadTooLarge(f"request body of {request.content_length} bytes is too large"))
    else:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not begun (as aiohttp's own handler does)
        return None
    response.force_close()
    return response


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
    app.router.add_post("/v1/chat/completions", _chat, expect_handler=_expect)
    app.router.add_post("/v1/completions", _completions, expect_handler=_expect)
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
