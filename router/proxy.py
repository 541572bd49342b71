"""The proxy: sends one call to one pod and relays the answer to the client.

Non-streamed answers are read whole (up to `max_answer_bytes`), then relayed;
streamed answers are relayed event by event as server-sent events, with
backpressure (each write waits for the client's socket to drain), holding at
most one incomplete event (`max_event_bytes`). Until the first byte has gone
to the client, a pod that cannot be reached or breaks off raises a retryable
`UpstreamError`, so the caller can try another pod. After that, a pod that
breaks off, goes silent, sends an oversized event or ends without
`data: [DONE]` ends the client's stream with an SSE error event, and the
outcome is marked broken (counted in `kvgate_stream_errors`).

Usage (prompt and completion tokens) is read from the answer, and from the
stream's final usage chunk, which the proxy asks for and strips again when
the client did not ask for it itself.

Timeouts (see `UpstreamSettings`): a non-streamed answer has a total budget
scaled by its `max_tokens`; a stream has a deadline for its first chunk and
one for each silence after that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from router.errors import UpstreamTimeout, UpstreamTooLarge, UpstreamUnavailable
from router.metrics import GatewayMetrics
from router.routing import Lease
from router.schema import Call
from router.settings import UpstreamSettings

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout as _deadline

log = logging.getLogger(__name__)

_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
_FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent")
_EVENT_END = b"\n\n"
_DONE = b"data: [DONE]"
_DECODER = json.JSONDecoder()
#: Non-streamed budgets cached per `max_tokens` value, up to this many.
_TIMEOUT_CACHE = 1024


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

    def __init__(
        self, session: aiohttp.ClientSession, settings: UpstreamSettings, metrics: GatewayMetrics | None = None
    ) -> None:
        self._session = session
        self._settings = settings
        self._metrics = metrics
        # Built once: per-request construction of these shows in profiles.
        # A stream's headers come under aiohttp's read timeout; its chunks under the
        # deadlines of `_next_chunk` (first chunk, then each silence), which are shorter.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_s,
            sock_read=max(settings.first_byte_timeout_s, settings.read_timeout_s),
        )
        self._whole_timeouts: dict[int | None, aiohttp.ClientTimeout] = {}
        self._urls: dict[tuple[str, str], URL] = {}

    def answer_budget_s(self, max_tokens: int | None) -> float:
        """Seconds a non-streamed answer may take, from sending the call to its last byte.

        `first_byte_timeout_s` (queueing and prefill) plus `max_tokens` at the
        slowest decode rate a healthy pod keeps, capped by `max_answer_s`.
        """
        s = self._settings
        if max_tokens is None or s.min_decode_tokens_per_s <= 0:
            return s.max_answer_s
        return min(s.max_answer_s, s.first_byte_timeout_s + max_tokens / s.min_decode_tokens_per_s)

    def _whole_timeout(self, max_tokens: int | None) -> aiohttp.ClientTimeout:
        timeout = self._whole_timeouts.get(max_tokens)
        if timeout is None:
            if len(self._whole_timeouts) >= _TIMEOUT_CACHE:
                self._whole_timeouts.clear()
            timeout = self._whole_timeouts[max_tokens] = aiohttp.ClientTimeout(
                total=self.answer_budget_s(max_tokens), sock_connect=self._settings.connect_timeout_s
            )
        return timeout

    def _too_large(self, lease: Lease, message: str) -> UpstreamTooLarge:
        if self._metrics is not None:
            self._metrics.upstream_too_large.labels(lease.pod.id).inc()
        log.warning("pod %s: %s", lease.pod.id, message)
        return UpstreamTooLarge(f"pod {lease.pod.id} {message}")

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
        data = self._upstream_body(call, raw)
        try:
            if not call.stream:
                return await self._session.post(url, data=data, headers=forwarded, timeout=self._whole_timeout(call.max_tokens))
            if self._settings.read_timeout_s <= self._settings.first_byte_timeout_s:
                return await self._session.post(url, data=data, headers=forwarded, timeout=self._stream_timeout)
            async with _deadline(self._settings.first_byte_timeout_s):
                return await self._session.post(url, data=data, headers=forwarded, timeout=self._stream_timeout)
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(f"pod {lease.pod.id} did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"pod {lease.pod.id} could not be reached: {exc}") from exc

    async def relay_whole(self, lease: Lease, upstream: aiohttp.ClientResponse) -> tuple[web.Response, Outcome]:
        """Read the whole answer (at most `max_answer_bytes`), then build the client's response.

        Raises:
            UpstreamUnavailable / UpstreamTimeout: the pod broke off before the answer was complete.
            UpstreamTooLarge: the answer is larger than `max_answer_bytes` (nothing more is read).
        """
        limit = self._settings.max_answer_bytes
        try:
            if upstream.content_length is not None and upstream.content_length > limit:
                raise self._too_large(lease, f"announced an answer of {upstream.content_length} bytes (limit {limit})")
            payload = bytearray()
            content = upstream.content
            while True:
                chunk = content.read_nowait()  # what has arrived, without a timer
                if not chunk:
                    if content.at_eof():
                        break
                    # The body follows its headers at once; a silence here is a broken pod
                    # (and a stream call answered with an error has no total budget).
                    async with _deadline(self._settings.read_timeout_s):
                        chunk = await content.readany()
                    if not chunk:
                        break
                payload += chunk
                if len(payload) > limit:
                    raise self._too_large(lease, f"sent an answer larger than {limit} bytes")
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(f"pod {lease.pod.id} did not finish its answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"pod {lease.pod.id} broke off: {exc}") from exc
        finally:
            # Closing (not releasing) a connection whose answer was not read to the end.
            if upstream.content.at_eof():  # read to the end: the connection can be reused
                upstream.release()
            else:
                upstream.close()
        lease.first_token(timed=False)  # the whole answer is in: not a time to first token
        outcome = Outcome(upstream.status, first_byte_at=time.perf_counter())
        if upstream.status == 200:
            _read_usage(payload, outcome)
        response = web.Response(
            status=upstream.status,
            body=payload,  # no copy: up to max_answer_bytes
            content_type=upstream.content_type or "application/json",
            headers={"x-kvgate-pod": lease.pod.id},
        )
        await lease.finish()
        return response, outcome

    async def relay_stream(
        self, lease: Lease, call: Call, upstream: aiohttp.ClientResponse, request: web.Request
    ) -> tuple[web.StreamResponse, Outcome]:
        """Relay a server-sent event stream event by event.

        The first chunk is read before the client's response starts, so a pod
        that fails before producing anything still raises a retryable error.
        Complete events are written as they arrive; an incomplete one is held
        until its end comes, and only up to `max_event_bytes`.
        """
        outcome = Outcome(upstream.status)
        strip_usage = not call.wants_usage
        settings = self._settings
        try:
            first = await _next_chunk(lease, upstream, settings.first_byte_timeout_s)
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
        pending = bytearray()
        done = False
        failure: tuple[str, str] | None = None
        try:
            await response.prepare(request)
            chunk = first
            while chunk:
                start = max(len(pending) - 1, 0)  # an event end may straddle two chunks
                pending += chunk
                cut = pending.rfind(_EVENT_END, start)
                if cut >= 0:
                    complete = bytes(pending[: cut + 2])
                    del pending[: cut + 2]
                    if not done and _DONE in complete:
                        done = True
                        await lease.finish()  # before the client sees the stream end
                    out = _scan_events(complete, outcome, strip_usage)
                    if out:
                        await response.write(out)
                if len(pending) > settings.max_event_bytes:
                    error = self._too_large(lease, f"sent a stream event larger than {settings.max_event_bytes} bytes")
                    failure = (error.message, error.type)
                    break
                try:
                    chunk = await _next_chunk(lease, upstream, settings.read_timeout_s)
                except (UpstreamUnavailable, UpstreamTimeout) as exc:
                    failure = (exc.message, exc.type)
                    break
            if failure is None and pending:
                if not done and _DONE in pending:
                    done = True
                    await lease.finish()
                await response.write(bytes(pending))
            if failure is None and not done:
                failure = (f"pod {lease.pod.id} ended the stream without 'data: [DONE]'", "upstream_error")
            if failure is not None:
                outcome.broken = True
                log.warning("pod %s broke off a stream: %s", lease.pod.id, failure[0])
                await response.write(_error_event(*failure))
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            log.info("client went away mid-stream from pod %s", lease.pod.id)
        finally:
            upstream.close()  # aborts the pod's generation if the client left early
        return response, outcome


async def _next_chunk(lease: Lease, upstream: aiohttp.ClientResponse, timeout_s: float) -> bytes:
    content = upstream.content
    try:
        chunk = content.read_nowait()  # what has arrived, without a timer
        if chunk or content.at_eof():
            return chunk
        async with _deadline(timeout_s):
            return await content.readany()
    except asyncio.TimeoutError as exc:
        raise UpstreamTimeout(f"pod {lease.pod.id} sent nothing for {timeout_s:g} s") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"pod {lease.pod.id} broke off the stream: {exc}") from exc


def _read_usage(payload: bytes | bytearray, outcome: Outcome) -> None:
    """Usage from a whole answer, parsing only its `"usage"` object, not the answer (up to 64 MiB)."""
    # In JSON text a quote inside a string is escaped, so `"usage"` is a key;
    # the engines put the answer's own usage last.
    at = payload.rfind(b'"usage"')
    colon = payload.find(b":", at + 7) if at >= 0 else -1
    if colon < 0:
        return
    try:
        usage, _ = _DECODER.raw_decode(payload[colon + 1 :].lstrip().decode("utf-8", "replace"))
    except ValueError:
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
