"""The gateway itself: latency it adds and the request rate it sustains on one core.

A stub engine (`kvgate.stub_engine`, its own process) answers every chat
completion at once with 4 tokens, so whatever time a request takes beyond
calling the stub directly is the gateway's. For each gateway:

- added latency: the same small non-streamed chat request (a ~200-token
  system prompt), sent one at a time, alternately in batches straight to the
  stub and through the gateway; p50 and p99 of each path and their
  difference; and the gateway's own CPU time per request over those batches
  (from /proc: it moves far less than latency when other jobs load the
  machine);
- sustained rate: closed-loop clients at increasing concurrency, each level
  for a few seconds, until two levels in a row fail to beat the best rate by
  `min_gain`; the best rate and its concurrency are reported.

With two or more CPUs and `taskset`, the gateway is pinned to CPU 0 and the
stub and this process (the client) to CPU 1, so "one core" means one core.
The stub and the client share their core: the stub's own best rate, measured
the same way, is the ceiling of what can be observed, and a gateway within
10% of it is marked `client_bound` (its true limit is higher).

Called by `kvgate.bench.runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from kvgate.bench.config import OverheadSpec
from kvgate.bench.cpu import group_cpu_seconds
from kvgate.bench.replicas import DEFAULT_STATE_URL, RouterGroup
from kvgate.bench.routers import LaunchContext, RouterSpec
from kvgate.bench.stats import percentile
from kvgate.model import SERVED_MODEL_NAME

#: The request every overhead measurement sends.
PAYLOAD = {
    "model": SERVED_MODEL_NAME,
    "max_tokens": 4,
    "messages": [{"role": "system", "content": "You are helpful. " * 50}, {"role": "user", "content": "Hi"}],
}
_LATENCY_ROUNDS = 10
_CLIENT_BOUND = 0.9


@dataclass(frozen=True, slots=True)
class RatePoint:
    """One level of the rate ladder."""

    concurrency: int
    rps: float
    errors: int


@dataclass(frozen=True, slots=True)
class GatewayOverhead:
    """One gateway in front of the stub. Latencies in milliseconds.

    Attributes:
        router: `family:policy`.
        direct_ms_p50 / direct_ms_p99: the stub called directly (interleaved with the gateway's batches).
        via_ms_p50 / via_ms_p99: through the gateway.
        added_ms_p50 / added_ms_p99: via minus direct, per percentile.
        max_rps: best closed-loop rate through the gateway.
        max_rps_concurrency: clients at that rate.
        curve: every ladder level.
        client_bound: max_rps is within 10% of the stub's own ceiling.
        errors: failed requests over the whole measurement.
        router_metrics: the gateway's own figures (kvgate: decision time).
        cpu_ms_per_request: the gateway's CPU time (user + system, every
            process of it) over the sequential batches, per request through
            it; None without /proc.
    """

    router: str
    direct_ms_p50: float
    direct_ms_p99: float
    via_ms_p50: float
    via_ms_p99: float
    added_ms_p50: float
    added_ms_p99: float
    max_rps: float
    max_rps_concurrency: int
    curve: tuple[RatePoint, ...]
    client_bound: bool
    errors: int
    router_metrics: dict[str, float]
    cpu_ms_per_request: float | None = None


@dataclass(frozen=True, slots=True)
class OverheadReport:
    """Every gateway's overhead, and the ceiling the client and stub allow.

    Attributes:
        stub_max_rps: best closed-loop rate calling the stub directly.
        stub_curve: the stub's ladder.
        pinned: whether the gateway and the client ran on separate pinned CPUs.
        gateways: one entry per gateway measured.
        failures: gateway -> why it could not be measured.
    """

    stub_max_rps: float
    stub_curve: tuple[RatePoint, ...]
    pinned: bool
    gateways: tuple[GatewayOverhead, ...]
    failures: dict[str, str]


class StubProcess:
    """The stub engine as a subprocess (`python -m kvgate.stub_engine --port 0`)."""

    def __init__(self, log_path: Path, cpus: str | None) -> None:
        self.log_path = log_path
        self.cpus = cpus
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def spawn(self) -> None:
        """Start the process; returns at once (see `wait_listening`)."""
        argv = [sys.executable, "-m", "kvgate.stub_engine", "--port", "0", "--tokens", "4"]
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, start_new_session=True
            )

    async def wait_listening(self, timeout: float = 30.0) -> str:
        """Wait for the stub's `stub: URL` line; returns the URL.

        Raises:
            RuntimeError: it exited or said nothing in time.
        """
        assert self._proc is not None and self._proc.stdout is not None, "spawn() first"
        line = await asyncio.wait_for(asyncio.to_thread(self._proc.stdout.readline), timeout)
        if not line.startswith("stub: "):
            raise RuntimeError(f"stub engine did not start (said {line!r}); log {self.log_path}")
        self.url = line.split(" ", 1)[1].strip()
        return self.url

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()


@contextlib.contextmanager
def pinned_to(cpus: set[int] | None) -> Iterator[None]:
    """Run this process on `cpus` for the duration of the block (no-op for None)."""
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


async def sequential_latencies(
    http: aiohttp.ClientSession, url: str, body: bytes, count: int
) -> tuple[list[float], int]:
    """Send `count` requests one after another; return their latencies (s) and failures."""
    out, errors = [], 0
    for _ in range(count):
        start = time.perf_counter()
        try:
            async with http.post(
                url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
            ) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    continue
        except (aiohttp.ClientError, asyncio.TimeoutError):
            errors += 1
            continue
        out.append(time.perf_counter() - start)
    return out, errors


async def closed_loop_rate(
    http: aiohttp.ClientSession, url: str, body: bytes, concurrency: int, seconds: float
) -> RatePoint:
    """Completed requests per second with `concurrency` closed-loop clients for `seconds`."""
    done = errors = 0
    end = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done, errors
        while time.perf_counter() < end:
            try:
                async with http.post(
                    url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
                ) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1
                    else:
                        errors += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return RatePoint(concurrency=concurrency, rps=done / (time.perf_counter() - started), errors=errors)


async def rate_ladder(http: aiohttp.ClientSession, url: str, body: bytes, spec: OverheadSpec) -> list[RatePoint]:
    """Climb the concurrency ladder until the rate stops growing (see `OverheadSpec.min_gain`)."""
    points: list[RatePoint] = []
    best, stale = 0.0, 0
    for concurrency in spec.concurrency:
        point = await closed_loop_rate(http, url, body, concurrency, spec.rate_step_s)
        points.append(point)
        if point.rps > best * (1.0 + spec.min_gain):
            stale = 0
        else:
            stale += 1
        best = max(best, point.rps)
        if stale >= 2:
            break
    return points


def _best(points: Sequence[RatePoint]) -> RatePoint:
    return max(points, key=lambda p: p.rps)


async def _measure_gateway(
    http: aiohttp.ClientSession, router: RouterGroup, stub_url: str, body: bytes, spec: OverheadSpec, ceiling: float
) -> GatewayOverhead:
    await sequential_latencies(http, stub_url, body, spec.warmup_requests)
    await sequential_latencies(http, router.url, body, spec.warmup_requests)
    direct: list[float] = []
    via: list[float] = []
    errors = 0
    batch = max(spec.latency_requests // _LATENCY_ROUNDS, 1)
    cpu_before = group_cpu_seconds(router.pids)
    for _ in range(_LATENCY_ROUNDS):
        got, bad = await sequential_latencies(http, stub_url, body, batch)
        direct += got
        got, bad_via = await sequential_latencies(http, router.url, body, batch)
        via += got
        errors += bad + bad_via
    cpu_after = group_cpu_seconds(router.pids)
    cpu_ms = None
    if cpu_before is not None and cpu_after is not None and via:
        cpu_ms = (cpu_after - cpu_before) * 1000.0 / len(via)
    curve = await rate_ladder(http, router.url, body, spec)
    best = _best(curve)
    ms = 1000.0
    return GatewayOverhead(
        router=router.spec.name,
        direct_ms_p50=percentile(direct, 50) * ms,
        direct_ms_p99=percentile(direct, 99) * ms,
        via_ms_p50=percentile(via, 50) * ms,
        via_ms_p99=percentile(via, 99) * ms,
        added_ms_p50=(percentile(via, 50) - percentile(direct, 50)) * ms,
        added_ms_p99=(percentile(via, 99) - percentile(direct, 99)) * ms,
        max_rps=best.rps,
        max_rps_concurrency=best.concurrency,
        curve=tuple(curve),
        client_bound=best.rps >= _CLIENT_BOUND * ceiling,
        errors=errors + sum(p.errors for p in curve),
        router_metrics=await router.scrape(http),
        cpu_ms_per_request=cpu_ms,
    )


async def measure_overhead(
    routers: Sequence[RouterSpec],
    spec: OverheadSpec,
    *,
    model_dir: Path,
    log_dir: Path,
    on_step: Callable[[str], None] | None = None,
    state_url: str = DEFAULT_STATE_URL,
) -> OverheadReport:
    """Measure each gateway in front of a fresh stub engine.

    Args:
        routers: the gateways.
        spec: request counts and the rate ladder.
        model_dir: kvgate's tokenizer directory.
        log_dir: where the stub's and routers' logs go.
        on_step: called with a short label as each step starts (progress).
        state_url: the Redis a kvgate with shared state (`+state`) writes to;
            its row minus the same gateway's row without is what sharing costs.

    Returns:
        The report; a gateway that fails to start is listed in `failures`.
    """
    step = on_step or (lambda _label: None)
    can_pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None and hasattr(os, "sched_setaffinity")
    gateway_cpus, client_cpus = ("0", {1}) if can_pin else (None, None)
    body = json.dumps(PAYLOAD).encode()
    stub = StubProcess(log_dir / "stub-engine.log", "1" if can_pin else None)
    gateways: list[GatewayOverhead] = []
    failures: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    try:
        stub.spawn()
        stub_url = await stub.wait_listening()
        with pinned_to(client_cpus):
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
                await sequential_latencies(http, stub_url, body, spec.warmup_requests)
                step("stub ceiling")
                stub_curve = await rate_ladder(http, stub_url, body, spec)
                ceiling = _best(stub_curve).rps
                for router_spec in routers:
                    step(f"overhead {router_spec.name}")
                    ctx = LaunchContext(
                        worker_urls=(stub_url,), model_dir=model_dir, log_dir=log_dir, cpus=gateway_cpus
                    )
                    router = RouterGroup(router_spec, ctx, state_url=state_url)
                    try:
                        router.start()
                        await router.wait_ready(http)
                        gateways.append(await _measure_gateway(http, router, stub_url, body, spec, ceiling))
                    except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        failures[router_spec.name] = f"{type(exc).__name__}: {exc}"[:2000]
                    finally:
                        router.stop()
    finally:
        stub.stop()
    return OverheadReport(
        stub_max_rps=ceiling,
        stub_curve=tuple(stub_curve),
        pinned=can_pin,
        gateways=tuple(gateways),
        failures=failures,
    )
