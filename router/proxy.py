"""The proxy: sends one call to one pod and relays the answer to the client.

Non-streamed answers are read whole, then relayed; streamed answers are relayed
chunk by chunk as server-sent events, with backpressure (each write waits for
the client's socket to drain). Until the first byte has gone to the client, a
pod that cannot be reached or breaks off raises a retryable `UpstreamError`,
so the caller can try another pod. After that, a pod that breaks off ends the
client's stream with an SSE error event.

Usage (prompt and completion tokens) is read from the answer, and from the
stream's final usage chunk, which the proxy asks for and strips again when
the client did not ask for it itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from router.errors import UpstreamTimeout, UpstreamUnavailable
from router.routing import Lease
from router.schema import Call
from router.settings import UpstreamSettings

log = logging.getLogger(__name__)

_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
_FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent")
_EVENT_END = b"\n\n"


@dataclass(slots=True)
class Outcome:
    """What came of a proxied call."""

    status: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    broken: bool = False
    """The pod broke off mid-stream."""
    first_byte_at: float | None = None
    """`time.perf_counter()` when the pod's first answer byte arrived."""


class Proxy:
    """Relays calls to pods over one shared HTTP client session."""

    def __init__(self, session: aiohttp.ClientSession, settings: UpstreamSettings) -> None:
        self._session = session
        self._settings = settings
        # Built once: per-request construction of these shows in profiles.
        self._timeouts = {
            stream: aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.connect_timeout_s,
                sock_read=settings.read_timeout_s if stream else settings.first_byte_timeout_s,
            )
            for stream in (False, True)
        }
        self._urls: dict[tuple[str, str], URL] = {}

    def _upstream_body(self, call: Call, raw: bytes) -> bytes:
        if not call.stream or call.wants_usage:
            return raw  # forward the client's bytes untouched
        body = dict(call.body)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return json.dumps(body).encode()

    async def open(self, lease: Lease, call: Call, raw: bytes, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """Send `call` to the lease's pod and wait for the response headers.

        Raises:
            UpstreamUnavailable: the pod could not be reached or closed the connection.
            UpstreamTimeout: the pod did not answer in time.
        """
        forwarded = {"content-type": "application/json"}
        for name in _FORWARDED_HEADERS:
            value = headers.get(name)
            if value is not None:
                forwarded[name] = value
        url = self._urls.get((lease.pod.url, call.kind))
        if url is None:
            url = self._urls[(lease.pod.url, call.kind)] = URL(lease.pod.url + _PATHS[call.kind])
        try:
            return await self._session.post(
                url, data=self._upstream_body(call, raw), headers=forwarded, timeout=self._timeouts[call.stream]
            )
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(f"pod {lease.pod.id} did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"pod {lease.pod.id} could not be reached: {exc}") from exc

    async def relay_whole(self, lease: Lease, upstream: aiohttp.ClientResponse) -> tuple[web.Response, Outcome]:
        """Read the whole answer, then build the client's response.

        Raises:
            UpstreamUnavailable / UpstreamTimeout: the pod broke off before the answer was complete.
        """
        try:
            payload = await upstream.read()
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(f"pod {lease.pod.id} stopped answering") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"pod {lease.pod.id} broke off: {exc}") from exc
        finally:
            upstream.release()
        lease.first_token()
        outcome = Outcome(upstream.status, first_byte_at=time.perf_counter())
        if upstream.status == 200:
            _read_usage(payload, outcome)
        response = web.Response(
            status=upstream.status,
            body=payload,
            content_type=upstream.content_type or "application/json",
            headers={"x-kvgate-pod": lease.pod.id},
        )
        return response, outcome

    async def relay_stream(
        self, lease: Lease, call: Call, upstream: aiohttp.ClientResponse, request: web.Request
    ) -> tuple[web.StreamResponse, Outcome]:
        """Relay a server-sent event stream chunk by chunk.

        The first chunk is read before the client's response starts, so a pod
        that fails before producing anything still raises a retryable error.
        """
        outcome = Outcome(upstream.status)
        strip_usage = not call.wants_usage
        try:
            first = await _next_chunk(lease, upstream)
        except BaseException:
            upstream.close()
            raise
        lease.first_token()
        outcome.first_byte_at = time.perf_counter()
        response = web.StreamResponse(
            status=upstream.status,
            headers={
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                "x-kvgate-pod": lease.pod.id,
            },
        )
        pending = b""
        try:
            await response.prepare(request)
            chunk = first
            while chunk:
                pending += chunk
                cut = pending.rfind(_EVENT_END)
                if cut >= 0:
                    complete, pending = pending[: cut + 2], pending[cut + 2 :]
                    out = _scan_events(complete, outcome, strip_usage)
                    if out:
                        await response.write(out)
                try:
                    chunk = await _next_chunk(lease, upstream)
                except (UpstreamUnavailable, UpstreamTimeout) as exc:
                    outcome.broken = True
                    log.warning("pod %s broke off a stream: %s", lease.pod.id, exc.message)
                    await response.write(_error_event(exc.message, exc.type))
                    break
            if pending and not outcome.broken:
                await response.write(pending)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            log.info("client went away mid-stream from pod %s", lease.pod.id)
        finally:
            upstream.close()  # aborts the pod's generation if the client left early
        return response, outcome


async def _next_chunk(lease: Lease, upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.content.readany()
    except asyncio.TimeoutError as exc:
        raise UpstreamTimeout(f"pod {lease.pod.id} stopped streaming") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"pod {lease.pod.id} broke off the stream: {exc}") from exc


def _read_usage(payload: bytes, outcome: Outcome) -> None:
    try:
        usage = json.loads(payload).get("usage") or {}
    except (ValueError, AttributeError):
        return
    _take_usage(usage, outcome)


def _take_usage(usage: object, outcome: Outcome) -> None:
    if isinstance(usage, dict):
        if isinstance(usage.get("prompt_tokens"), int):
            outcome.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            outcome.completion_tokens = usage["completion_tokens"]


def _scan_events(events: bytes, outcome: Outcome, strip_usage: bool) -> bytes:
    """Read usage from complete SSE events; drop the usage-only event if the client did not ask for it."""
    if b'"usage"' not in events:
        return events
    kept = []
    for event in events.split(_EVENT_END):
        if not event:
            continue
        if b'"usage"' in event and event.startswith(b"data: {"):
            try:
                data = json.loads(event[6:])
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("usage"):
                _take_usage(data["usage"], outcome)
                if strip_usage and not data.get("choices"):
                    continue
        kept.append(event + _EVENT_END)
    return b"".join(kept)


def _error_event(message: str, kind: str) -> bytes:
    payload = {"error": {"message": message, "type": kind, "param": None, "code": 502}}
    return b"data: " + json.dumps(payload).encode() + _EVENT_END
