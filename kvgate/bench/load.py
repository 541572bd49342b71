"""The load generator: replays a workload closed-loop and times every request.

`run_workload` starts `workload.clients` clients. Each takes the next session
from a shared queue and sends its requests one at a time, each as soon as the
previous answer has fully arrived (closed loop: at most `clients` requests in
flight, no think time). With `workload.duration_s` set, clients stop issuing
new requests when the duration is over and the requests in flight finish.
A request naming another in `after` waits until that one has finished
(answered or failed); the workload puts the other one earlier in the queue,
so some client is already sending it.

Given several router URLs (replicas of one router), each request goes to the
next URL in turn, whichever client sends it, as a round-robin load balancer
in front of the replicas would: consecutive turns of one session usually land
on different replicas.

Every request is a streamed chat completion (SSE). Its time to first token is
the arrival of the first event that carries a choice (vLLM sends it once the
prefill is done and the first token exists); its token counts come from the
final usage event. A status other than 200, a broken stream, an error event or
a timeout is a failed request, recorded with its message, never raised.

Called by `kvgate.bench.runner`; it knows nothing of routers or engines.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvgate.bench.workloads import BenchRequest, Session, Workload

_ERROR_CHARS = 300

#: Response header in which kvgate names the pod that served a request.
POD_HEADER = "x-kvgate-pod"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one request. Times are seconds since the run started.

    Attributes:
        request_id: the workload's request id.
        session_id: the session it belongs to.
        user: who sent it.
        sent_s: when the request was sent.
        first_token_s: when the first token arrived; None if none did.
        done_s: when the answer ended (or failed).
        status: HTTP status; 0 when no response arrived.
        error: why it failed; None on success.
        prompt_tokens: engine-reported prompt tokens (usage), if reported.
        completion_tokens: engine-reported generated tokens, if reported.
        pod: the engine that served it, when the router says so (kvgate's
            `x-kvgate-pod` header); None otherwise.
    """

    request_id: str
    session_id: str
    user: str
    sent_s: float
    first_token_s: float | None
    done_s: float
    status: int
    error: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    pod: str | None = None

    @property
    def ok(self) -> bool:
        """Answered 200 with a complete stream."""
        return self.status == 200 and self.error is None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token, in seconds."""
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def latency_s(self) -> float:
        """End-to-end latency, in seconds."""
        return self.done_s - self.sent_s


@dataclass(frozen=True, slots=True)
class RunTrace:
    """Everything a replay produced.

    Attributes:
        records: one per request sent, in completion order.
        wall_s: seconds from the first send to the last answer.
        exhausted_sessions: sessions of a timed workload that ran out of
            requests before the duration was over (their client idled).
    """

    records: tuple[RequestRecord, ...]
    wall_s: float
    exhausted_sessions: int = 0

    def in_send_order(self) -> list[RequestRecord]:
        """Records sorted by send time."""
        return sorted(self.records, key=lambda r: r.sent_s)


@dataclass(slots=True)
class _Stream:
    """What one SSE stream said, filled in as events arrive."""

    first_token_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    content_chunks: int = 0
    error: str | None = None
    done: bool = False

    def feed(self, event: dict[str, Any], now: float) -> None:
        if "error" in event:
            self.error = f"error event: {json.dumps(event['error'])[:_ERROR_CHARS]}"
            return
        if event.get("choices"):
            if self.first_token_at is None:
                self.first_token_at = now
            self.content_chunks += 1
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)


async def send(
    http: aiohttp.ClientSession, url: str, request: BenchRequest, *, model: str, session_id: str, origin: float
) -> RequestRecord:
    """Send one streamed chat completion and time it.

    Args:
        http: the client session (its timeout applies).
        url: base URL of the router (or engine).
        request: what to send.
        model: served model name.
        session_id: recorded with the result.
        origin: `time.perf_counter()` at the start of the run.

    Returns:
        The record; failures are recorded, not raised.
    """
    stream = _Stream()
    status = 0
    pod = None
    sent = time.perf_counter()
    try:
        async with http.post(f"{url}/v1/chat/completions", json=request.body(model)) as response:
            status = response.status
            pod = response.headers.get(POD_HEADER)
            if status != 200:
                stream.error = f"HTTP {status}: {(await response.text())[:_ERROR_CHARS]}"
            else:
                async for raw in response.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        stream.done = True
                        break
                    stream.feed(json.loads(data), time.perf_counter())
                    if stream.error:
                        break
                if stream.error is None and not stream.done:
                    stream.error = "stream ended without [DONE]"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
    done = time.perf_counter()
    completion = stream.completion_tokens
    if completion is None and stream.error is None:
        completion = stream.content_chunks  # no usage event: one token per chunk
    return RequestRecord(
        request_id=request.id,
        session_id=session_id,
        user=request.user,
        sent_s=sent - origin,
        first_token_s=None if stream.first_token_at is None else stream.first_token_at - origin,
        done_s=done - origin,
        status=status,
        error=stream.error,
        prompt_tokens=stream.prompt_tokens,
        completion_tokens=completion,
        pod=pod,
    )


async def run_workload(
    url: str | Sequence[str],
    workload: Workload,
    *,
    model: str,
    request_timeout_s: float = 300.0,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> RunTrace:
    """Replay `workload` against `url`, closed loop.

    Args:
        url: base URL of the router under test, or of each of its replicas
            (requests go round them in turn).
        workload: the trace and its clients.
        model: served model name.
        request_timeout_s: longest one request may take before it counts as failed.
        on_record: called with each record as it completes (progress display).

    Returns:
        Every request's record and the run's wall time.
    """
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("run_workload needs at least one router URL")
    turn = itertools.count()
    queue: deque[Session] = deque(workload.sessions)
    records: list[RequestRecord] = []
    exhausted = 0
    timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    origin = time.perf_counter()
    deadline = None if workload.duration_s is None else origin + workload.duration_s

    finished: dict[str, asyncio.Event] = {}

    def expired() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    def done_event(request_id: str) -> asyncio.Event:
        return finished.setdefault(request_id, asyncio.Event())

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal exhausted
        while queue and not expired():
            session = queue.popleft()
            for request in session.requests:
                if expired():
                    return
                if request.after is not None:
                    await done_event(request.after).wait()
                target = urls[next(turn) % len(urls)]
                record = await send(http, target, request, model=model, session_id=session.id, origin=origin)
                records.append(record)
                done_event(request.id).set()
                if on_record is not None:
                    on_record(record)
            if deadline is not None and not expired():
                exhausted += 1

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await asyncio.gather(*(client(http) for _ in range(workload.clients)))
    wall = max((r.done_s for r in records), default=0.0) - min((r.sent_s for r in records), default=0.0)
    return RunTrace(records=tuple(records), wall_s=wall, exhausted_sessions=exhausted)
