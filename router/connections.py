"""Client connections: limits, timeouts, and OpenAI-shaped errors from the HTTP parser.

aiohttp's server is production-grade but leaves three things to its user,
which `GatewayRunner` (an `aiohttp.web.AppRunner`) adds for the gateway:

- a slow client cannot hold a connection: the request line and headers must
  arrive within `header_timeout_s` of their first byte (else 408 and close),
  an idle keep-alive connection closes after `keepalive_timeout_s`, and the
  body's deadline is `router.body`'s;
- at most `max_connections` client connections are open; one more gets a
  503 and is closed before anything is read from it;
- what aiohttp's parser refuses (line or header too long, too many headers,
  bad Content-Length, bad chunking, garbage) or does not expect (an `Expect`
  other than 100-continue) answers OpenAI-shaped JSON with its status (400,
  417, 431), like every other error, instead of plain text.

`router.server` runs the gateway with it, and the loopback tests too.
Not here: routes and error rendering of the handlers (`router.app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler

from router.errors import (
    ExpectationFailed,
    GatewayError,
    HeadersTooLarge,
    InvalidRequest,
    NoCapacity,
    RequestTimeout,
    UpstreamTimeout,
)
from router.metrics import GatewayMetrics
from router.settings import ServerSettings

log = logging.getLogger(__name__)

#: Seconds aiohttp keeps reading (and dropping) a body its handler did not
#: read before it closes: long enough for a client to see its error answer.
_LINGER_S = 2.0

#: aiohttp's limit on header fields per request (its default, kept).
_MAX_HEADERS = 128

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def raw_response(error: GatewayError) -> bytes:
    """A complete HTTP/1.1 answer for `error`, closing the connection, for writing to a transport."""
    body = error.to_json()
    head = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if error.status in (429, 503):
        head.append("Retry-After: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def parser_error(status: int, exc: BaseException | None) -> GatewayError:
    """The gateway error for what aiohttp's protocol handler caught (a parse error, or a handler's escape)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, LineTooLong):
        return HeadersTooLarge(f"the request line or a header field is longer than {exc.args[1]} bytes")
    # NOTE: aiohttp raises the generic BadHttpMessage for too many headers; its text is the only sign.
    if isinstance(exc, BadHttpMessage) and "too many headers" in str(exc.message).lower():
        return HeadersTooLarge(f"more than {_MAX_HEADERS} header fields")
    if isinstance(exc, HttpProcessingError):
        return InvalidRequest(f"malformed HTTP request: {exc.message or type(exc).__name__}")
    if status == 504:
        return UpstreamTimeout("the gateway timed out serving the request")
    return GatewayError("internal error in the gateway")


class GatewayProtocol(RequestHandler):
    """aiohttp's per-connection handler with a header deadline, a connection cap and JSON parse errors."""

    def __init__(
        self, manager: GatewayServer, *, loop: asyncio.AbstractEventLoop, limits: ServerSettings, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._gateway_server = manager
        self._event_loop = loop
        self._limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._handling = False
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gateway_server.open_connections >= self._limits.max_connections:
            self._refused = True
            self._gateway_server.cut_off("connection_limit")
            if self._gateway_server.refused % 1000 == 1:  # a flood must not flood the log too
                log.warning(
                    "refusing connections: %d open (server.max_connections); %d refused so far",
                    self._limits.max_connections,
                    self._gateway_server.refused,
                )
            error = NoCapacity(f"the gateway has {self._limits.max_connections} connections open; retry shortly")
            transport.write(raw_response(error))  # type: ignore[attr-defined] - a stream transport
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if data and self._header_timer is None and not self._handling:
            self._header_timer = self._event_loop.call_later(self._limits.header_timeout_s, self._headers_late)
        super().data_received(data)

    def request_started(self) -> None:
        """The request's head is parsed: its handler starts (the body has its own deadline)."""
        self._handling = True
        self._stop_header_timer()

    def request_finished(self) -> None:
        self._handling = False

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._handling or self.transport is None:
            return
        log.info("closing a connection whose request head took over %g s", self._limits.header_timeout_s)
        self._gateway_server.cut_off("header_timeout")
        error = RequestTimeout(f"request headers did not arrive within {self._limits.header_timeout_s:g} s")
        self.transport.write(raw_response(error))
        self.force_close()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """Render what aiohttp caught as OpenAI JSON with the right status, and close the connection."""
        error = parser_error(status, exc)
        if error.status >= 500:
            log.error("error serving a request from %s", request.remote, exc_info=exc)
        elif not isinstance(exc, BadHttpMethod):
            log.info("refused a malformed request from %s: %s", request.remote, error.message)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has begun; no error answer can follow")
        return _json_error(error)


def _json_error(error: GatewayError) -> web.Response:
    response = web.Response(status=error.status, body=error.to_json(), content_type="application/json")
    response.force_close()
    return response


class GatewayServer(web.Server):
    """aiohttp's low-level server making `GatewayProtocol`s, and counting refused connections."""

    def __init__(
        self,
        handler: _Handler,
        *,
        limits: ServerSettings,
        metrics: GatewayMetrics | None = None,
        request_factory: Any = None,
        handler_cancellation: bool = False,
        **protocol_kwargs: Any,
    ) -> None:
        async def marked(request: web.BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            assert isinstance(protocol, GatewayProtocol)
            protocol.request_started()
            try:
                expect = request.headers.get("expect")
                if expect is not None and expect.lower() != "100-continue":
                    # Before routing: aiohttp's own expect handler (every route's but
                    # the API's, and unknown paths') answers plain text, or fails on
                    # a value that is not UTF-8.
                    return _json_error(ExpectationFailed(f"'Expect: {expect}' is not supported; only 100-continue is"))
                return await handler(request)
            finally:
                protocol.request_finished()

        super().__init__(marked, request_factory=request_factory, handler_cancellation=handler_cancellation)
        self._limits = limits
        self._metrics = metrics
        self._protocol_kwargs = protocol_kwargs
        self._event_loop = asyncio.get_running_loop()
        self.refused = 0
        """Connections refused over `max_connections` since start."""

    def cut_off(self, reason: str) -> None:
        """Count a client cut off (`kvgate_client_cutoffs_total{reason}`)."""
        if reason == "connection_limit":
            self.refused += 1
        if self._metrics is not None:
            self._metrics.client_cutoffs.labels(reason).inc()

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self, loop=self._event_loop, limits=self._limits, **self._protocol_kwargs)


class GatewayRunner(web.AppRunner):
    """Runs the gateway's app on `GatewayServer`, with the connection settings of `limits`.

    NOTE: aiohttp has no public option for the protocol class; this runner
    overrides `_make_server` (the factory hook every aiohttp runner defines)
    and otherwise uses public API: `RequestHandler.handle_error`, `Server`'s
    constructor and `request.protocol`.

    Args:
        app: the application (`router.app.create_app`).
        limits: the server settings (timeouts, connection cap).
        metrics: where clients cut off are counted.
        **kwargs: more `AppRunner` options (`shutdown_timeout`, `access_log`).
    """

    def __init__(
        self, app: web.Application, *, limits: ServerSettings, metrics: GatewayMetrics | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout_s)
        kwargs.setdefault("lingering_time", _LINGER_S)
        kwargs.setdefault("max_headers", _MAX_HEADERS)
        kwargs.setdefault("access_log_class", AccessLogger)
        kwargs["auto_decompress"] = False  # router.body decodes, answering errors as 400/413/415
        kwargs["handler_cancellation"] = True  # a client that hangs up cancels its handler (and its pod call)
        runner_only = ("shutdown_timeout", "handle_signals", "handler_cancellation")
        self._protocol_kwargs = {k: v for k, v in kwargs.items() if k not in runner_only}
        super().__init__(app, **kwargs)
        self._limits = limits
        self._metrics = metrics

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # starts the app and freezes it
        return GatewayServer(
            base.request_handler,
            limits=self._limits,
            metrics=self._metrics,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            **self._protocol_kwargs,
        )


@contextlib.asynccontextmanager
async def serving(
    app: web.Application,
    limits: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics: GatewayMetrics | None = None,
) -> AsyncIterator[str]:
    """Serve `app` as the gateway is served, for the duration of the block; yields its base URL."""
    runner = GatewayRunner(app, limits=limits, metrics=metrics, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        address = runner.addresses[0]
        yield f"http://{address[0]}:{address[1]}"
    finally:
        await runner.cleanup()
