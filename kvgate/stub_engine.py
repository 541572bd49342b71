"""A small real HTTP server that answers like a vLLM engine, for loopback tests and benchmarks.

It serves `/v1/chat/completions` and `/v1/completions` (streamed and not, with
usage), `/v1/models`, `/health` and a vLLM-shaped `/metrics` (and, as vLLM, the
page of the series named only at `/metrics/?name[]=...`), and records every
call. Knobs make it misbehave: answer slowly, refuse with a status, drop the
connection before answering, or die in the middle of a stream; or saturate
like an engine: run at most `max_running` requests at once and keep the
others waiting first-come first-served, reported as `vllm:num_requests_waiting`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class StubBehaviour:
    delay_s: float = 0.0
    """Wait before answering (simulated prefill)."""
    chunk_delay_s: float = 0.0
    """Wait between streamed chunks."""
    fail_status: int | None = None
    """Answer every completion with this status."""
    drop_connection: bool = False
    """Close the connection without answering."""
    die_after_chunks: int | None = None
    """Break the connection after this many streamed chunks."""
    tokens: int = 4
    """Completion tokens per answer (unless max_tokens is lower)."""
    max_running: int | None = None
    """Requests run at once; later ones wait in arrival order (None: no limit). Call
    `StubEngine.admit` after raising it, to start the waiting ones that now fit."""
    kv_usage: float = 0.0
    """KV cache usage the engine reports (a fraction)."""


#: Upper bounds of the stub's time-to-first-token histogram, in seconds (a subset of vLLM's).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


@dataclass
class StubPrefixCache:
    """A stand-in for vLLM's prefix cache, so the stub's counters behave like an engine's.

    A prompt is its request body's JSON, 4 characters to a token; a block is
    `block_size` tokens. Every full block whose whole prefix was seen before
    is a hit. Capacity is `max_blocks`; past it everything is evicted at once.
    """

    max_blocks: int = 1 << 20

    seen: set[int] = field(default_factory=set)
    queries: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    """Cumulative count per bucket of `TTFT_BUCKETS`, as Prometheus exposes them."""
    ttft_count: int = 0
    ttft_sum: float = 0.0

    def first_token(self, seconds: float) -> None:
        """Observe one time to first token."""
        for i, le in enumerate(TTFT_BUCKETS):
            if seconds <= le:
                self.ttft_buckets[i] += 1
        self.ttft_count += 1
        self.ttft_sum += seconds

    def lookup(self, text: str, block_size: int) -> int:
        """Count one prompt; returns its tokens found cached."""
        tokens = len(text) // 4
        step = block_size * 4
        hit_blocks, missed, key = 0, False, 0
        for end in range(step, tokens * 4 + 1, step):
            key = hash((key, text[end - step : end]))  # chained: one key names the whole prefix
            if key in self.seen and not missed:
                hit_blocks += 1
            else:
                missed = True
                self.seen.add(key)
        if len(self.seen) > self.max_blocks:
            self.seen.clear()
        self.queries += tokens
        self.prompt_tokens += tokens
        self.hits += hit_blocks * block_size
        return hit_blocks * block_size


@dataclass
class StubEngine:
    model: str = "tiny-llama"
    adapters: tuple[str, ...] = ()
    """LoRA adapters served on top of `model` (listed with it as their `parent`)."""
    block_size: int = 16
    num_gpu_blocks: int = 64
    max_model_len: int = 4096
    behaviour: StubBehaviour = field(default_factory=StubBehaviour)
    calls: list[dict[str, Any]] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    healthy: bool = True
    url: str = ""
    prefix: "StubPrefixCache" = field(default_factory=lambda: StubPrefixCache())
    restricted_metrics: bool = True
    """Serve /metrics/?name[]=... with only the series named, as vLLM's metrics app does."""
    scrapes: Counter[str] = field(default_factory=Counter)
    """Metrics pages served: "full" or "restricted"."""
    _queue: deque[asyncio.Future] = field(default_factory=deque, repr=False)

    def admit(self) -> None:
        """Start waiting requests while fewer than `behaviour.max_running` run."""
        limit = self.behaviour.max_running
        while self._queue and (limit is None or self.running < limit):
            ready = self._queue.popleft()
            if not ready.done():
                self.running += 1
                self.waiting -= 1
                ready.set_result(None)

    async def _start(self) -> None:
        """Count one request as running, after waiting for a slot if `max_running` are."""
        limit = self.behaviour.max_running
        if limit is None or (self.running < limit and not self._queue):
            self.running += 1
            return
        ready = asyncio.get_running_loop().create_future()
        self._queue.append(ready)
        self.waiting += 1
        try:
            await ready
        except asyncio.CancelledError:
            if ready.done() and not ready.cancelled():
                self._finish()  # started just as the client left
            else:
                self.waiting -= 1
                with contextlib.suppress(ValueError):
                    self._queue.remove(ready)
            raise

    def _finish(self) -> None:
        self.running -= 1
        self.admit()

    def restart(self) -> None:
        """Behave as a restarted engine: calls forgotten, prefix cache and its counters from zero."""
        self.calls.clear()
        self.prefix = StubPrefixCache(self.prefix.max_blocks)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        if self.restricted_metrics:
            app.router.add_get("/metrics/", self._metrics)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        base = {"id": self.model, "object": "model", "root": self.model, "parent": None, "max_model_len": self.max_model_len}
        loras = [{"id": name, "object": "model", "root": f"/adapters/{name}", "parent": self.model} for name in self.adapters]
        return web.json_response({"object": "list", "data": [base, *loras]})

    async def _metrics(self, request: web.Request) -> web.Response:
        labels = f'engine="0",model_name="{self.model}"'
        cache = self.prefix
        lines = [
            "# HELP vllm:num_requests_running Number of requests running.",
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{engine="0",model_name="{self.model}"}} {float(self.running)}',
            f'vllm:num_requests_waiting{{engine="0",model_name="{self.model}"}} {float(self.waiting)}',
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="{self.model}"}} {float(self.behaviour.kv_usage)}',
            "# TYPE vllm:prefix_cache_queries counter",
            f"vllm:prefix_cache_queries_total{{{labels}}} {float(cache.queries)}",
            "# TYPE vllm:prefix_cache_hits counter",
            f"vllm:prefix_cache_hits_total{{{labels}}} {float(cache.hits)}",
            "# TYPE vllm:external_prefix_cache_queries counter",
            f"vllm:external_prefix_cache_queries_total{{{labels}}} {float(cache.queries - cache.hits)}",
            "# TYPE vllm:external_prefix_cache_hits counter",
            f"vllm:external_prefix_cache_hits_total{{{labels}}} 0.0",
            "# TYPE vllm:prompt_tokens counter",
            f"vllm:prompt_tokens_total{{{labels}}} {float(cache.prompt_tokens)}",
            "# TYPE vllm:prompt_tokens_cached_by_source counter",
            *(
                f'vllm:prompt_tokens_cached_by_source_total{{{labels},source="{source}"}} {float(cache.hits if source == "device" else 0)}'
                for source in ("device", "host", "p2p", "disk", "external_unspecified")
            ),
            f'vllm:cache_config_info{{block_size="{self.block_size}",engine="0",num_gpu_blocks="{self.num_gpu_blocks}"}} 1.0',
            "# TYPE vllm:time_to_first_token_seconds histogram",
            *(
                f'vllm:time_to_first_token_seconds_bucket{{{labels},le="{le}"}} {float(n)}'
                for le, n in zip(TTFT_BUCKETS, cache.ttft_buckets)
            ),
            f'vllm:time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} {float(cache.ttft_count)}',
            f"vllm:time_to_first_token_seconds_count{{{labels}}} {float(cache.ttft_count)}",
            f"vllm:time_to_first_token_seconds_sum{{{labels}}} {cache.ttft_sum}",
        ]
        names = request.query.getall("name[]", [])
        if request.path == "/metrics/" and names:
            # As prometheus_client's restricted registry: only samples of the names asked for.
            self.scrapes["restricted"] += 1
            lines = [line for line in lines if not line.startswith("#") and line.split("{")[0].split(" ")[0] in names]
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                # As prometheus_client's app: compressed whenever the client accepts it.
                body = gzip.compress(("\n".join(lines) + "\n").encode())
                return web.Response(body=body, content_type="text/plain", headers={"Content-Encoding": "gzip"})
        else:
            self.scrapes["full"] += 1
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append({"path": request.path, "body": body, "headers": dict(request.headers)})
        b = self.behaviour
        if b.drop_connection:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if b.fail_status is not None:
            return web.json_response({"error": {"message": "stub failure", "type": "stub", "code": b.fail_status}}, status=b.fail_status)
        started = asyncio.get_running_loop().time()
        await self._start()
        self.prefix.lookup(json.dumps(body.get("messages") or body.get("prompt")), self.block_size)
        try:
            if b.delay_s:
                await asyncio.sleep(b.delay_s)
            self.prefix.first_token(asyncio.get_running_loop().time() - started)
            n = min(b.tokens, body.get("max_tokens") or b.tokens)
            chat = request.path.endswith("chat/completions")
            prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt"))) // 4
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            if not body.get("stream"):
                choice = (
                    {"index": 0, "message": {"role": "assistant", "content": "tok " * n}, "finish_reason": "length"}
                    if chat
                    else {"index": 0, "text": "tok " * n, "finish_reason": "length"}
                )
                return web.json_response(
                    {"id": "cmpl-stub", "object": "chat.completion" if chat else "text_completion", "model": self.model, "choices": [choice], "usage": usage}
                )
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            for i in range(n):
                if b.die_after_chunks is not None and i >= b.die_after_chunks:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                delta = {"index": 0, "delta": {"content": "tok "}} if chat else {"index": 0, "text": "tok "}
                event = {"id": "cmpl-stub", "model": self.model, "choices": [delta]}
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if b.chunk_delay_s:
                    await asyncio.sleep(b.chunk_delay_s)
            if (body.get("stream_options") or {}).get("include_usage"):
                event = {"id": "cmpl-stub", "model": self.model, "choices": [], "usage": usage}
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self._finish()


@contextlib.asynccontextmanager
async def run_app(app: web.Application, host: str = "127.0.0.1", **runner_options: Any) -> AsyncIterator[str]:
    """Serve `app` on a free port of 127.0.0.1 for the duration of the block; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    try:
        address = runner.addresses[0]
        yield f"http://{address[0]}:{address[1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def run_stub(engine: StubEngine) -> AsyncIterator[StubEngine]:
    async with run_app(engine.app()) as url:
        engine.url = url
        yield engine


def main(argv: list[str] | None = None) -> int:
    """`python -m kvgate.stub_engine --port P`: serve a stub engine until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvgate.stub_engine")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--tokens", type=int, default=4, help="completion tokens per answer")
    parser.add_argument("--max-model-len", type=int, default=4096, help="context length /v1/models reports")
    parser.add_argument("--block-size", type=int, default=16, help="block size /metrics reports")
    args = parser.parse_args(argv)
    engine = StubEngine(
        model=args.model,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        behaviour=StubBehaviour(tokens=args.tokens),
    )

    async def serve() -> None:
        runner = web.AppRunner(engine.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"stub: http://{host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
