"""The benchmark's engines: started once, reset between runs, read before and after each.

An `EngineFleet` is N real vLLM CPU engines (`kvgate.engines`) on the tiny
model, one OpenMP thread each, with a fixed KV capacity
(`--num-gpu-blocks-override`) so cache pressure is the same on every run.
Between runs it waits until no engine has a request left, then empties every
prefix cache with `POST /reset_prefix_cache` and fails loudly unless every
engine answers 200 with `{"success": true}` (otherwise one router's cache
would carry into the next router's run). Hit rates are deltas of the engines'
own counters over a run.

With `kv_events`, each engine also publishes its KV events over ZMQ, through
a loopback relay (`event_relay`), and serves vLLM's scale-out endpoints
(`--enable-scale-out`): vllm-router's `kv_aware` policy needs both. With
`engine_args` (the shared KV cache's `--kv-transfer-config`, from
`engine_sets`) every engine gets them too.

`restart` kills one engine and starts it again on the same port while the
others serve (the `shared-cache` workload's crash). Its counters start again
from zero, so the fleet carries what the killed engine had counted into the
figures it reports: deltas over a run stay right (less what the engine
counted between its last scrape and its death).

Called by `kvgate.bench.runner`. Not here: routers (`routers`), load (`load`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import aiohttp

from kvgate.bench.event_relay import EventRelay
from kvgate.engines import Engine, EngineSpec, free_ports, start_engines, stop_engines
from kvgate.model import SERVED_MODEL_NAME

#: Prometheus series summed into `EngineCounters`, by field.
_SERIES = {
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:request_success_total": "requests",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:request_queue_time_seconds_sum": "queue_s",
    "vllm:request_prefill_time_seconds_sum": "prefill_s",
    "vllm:request_decode_time_seconds_sum": "decode_s",
    "vllm:time_to_first_token_seconds_sum": "ttft_s",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:external_prefix_cache_queries_total": "external_queries",
    "vllm:external_prefix_cache_hits_total": "external_hits",
}
#: Prompt tokens by where they came from; only the computed ones are kept (`prefill_computed`).
_BY_SOURCE = "vllm:prompt_tokens_by_source_total"
_COMPUTED = 'source="local_compute"'

_GAUGES = frozenset({"running", "waiting"})


class FleetError(RuntimeError):
    """An engine misbehaved: it did not reset its cache, did not drain, or did not answer."""


@dataclass(frozen=True, slots=True)
class EngineCounters:
    """One engine's counters (cumulative) and load gauges, from its /metrics.

    Attributes:
        prefix_queries: prompt tokens looked up in the prefix cache.
        prefix_hits: of those, tokens served from the cache.
        prompt_tokens: prompt tokens received.
        generation_tokens: tokens generated.
        requests: requests finished (any reason).
        preemptions: requests preempted for lack of KV blocks.
        queue_s: seconds finished requests waited in the engine's queue (sum).
        prefill_s: seconds they spent in prefill (sum).
        decode_s: seconds they spent decoding (sum).
        ttft_s: engine-side time to first token (sum).
        running: requests running now (gauge).
        waiting: requests waiting now (gauge).
        external_queries: prompt tokens looked up in the shared KV cache
            (through the connector; 0 on plain engines).
        external_hits: of those, tokens loaded from it.
        prefill_computed: prompt tokens the engine computed itself (neither
            in its own cache nor loaded): the prefill work done.
    """

    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    requests: float = 0.0
    preemptions: float = 0.0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    external_queries: float = 0.0
    external_hits: float = 0.0
    prefill_computed: float = 0.0

    def since(self, before: EngineCounters) -> EngineCounters:
        """Counter deltas from `before` to self; gauges keep their current value."""
        return EngineCounters(
            **{
                f.name: getattr(self, f.name) - (0.0 if f.name in _GAUGES else getattr(before, f.name))
                for f in fields(self)
            }
        )

    def plus(self, earlier: EngineCounters) -> EngineCounters:
        """Counters of an earlier life of this engine added to self; gauges keep their current value."""
        return EngineCounters(
            **{
                f.name: getattr(self, f.name) + (0.0 if f.name in _GAUGES else getattr(earlier, f.name))
                for f in fields(self)
            }
        )

    @property
    def hit_rate(self) -> float:
        """prefix_hits / prefix_queries (0 without queries)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def parse_counters(text: str) -> EngineCounters:
    """Sum the series of `_SERIES` over their label sets in a Prometheus text body."""
    sums = dict.fromkeys((*_SERIES.values(), "prefill_computed"), 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace, space = line.find("{"), line.find(" ")
        name = line[: brace if 0 <= brace < space else space]
        field = _SERIES.get(name)
        if name == _BY_SOURCE and _COMPUTED in line:
            field = "prefill_computed"
        if field is None:
            continue
        value_text = line[line.rfind("}") + 1 :] if brace >= 0 else line[space:]
        try:
            sums[field] += float(value_text.split()[0])
        except (IndexError, ValueError):
            continue
    return EngineCounters(**sums)


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """How the benchmark's engines run.

    Attributes:
        model_dir: the tiny model's directory.
        engines: how many.
        kv_blocks: KV capacity per engine, in blocks.
        block_size: tokens per block (vLLM's CPU default, 128).
        max_model_len: longest prompt plus answer.
        kv_events: publish KV events over ZMQ and serve scale-out endpoints.
        log_dir: where each engine's log goes.
        engine_args: further arguments for every engine (`--engine-arg`, and
            the shared KV cache's connector config on shared engines).
        name: what the report calls this set of engines (`plain`, `shared`);
            also the engines' log file prefix.
    """

    model_dir: Path
    engines: int
    kv_blocks: int
    block_size: int
    max_model_len: int
    kv_events: bool
    log_dir: Path
    engine_args: tuple[str, ...] = ()
    name: str = "plain"


class EngineFleet:
    """N engines and the operations a benchmark run needs on them.

    Args:
        spec: how to run them.
    """

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        ports = free_ports(spec.engines)
        self.relays = [EventRelay() for _ in range(spec.engines)] if spec.kv_events else []
        self.engines = [
            Engine(
                EngineSpec(
                    model_dir=spec.model_dir,
                    port=ports[i],
                    served_model_name=SERVED_MODEL_NAME,
                    num_gpu_blocks=spec.kv_blocks,
                    max_model_len=spec.max_model_len,
                    block_size=spec.block_size,
                    extra_args=(*self._extra_args(i), *spec.engine_args),
                ),
                log_path=spec.log_dir / (f"engine-{i}.log" if spec.name == "plain" else f"engine-{spec.name}-{i}.log"),
            )
            for i in range(spec.engines)
        ]
        self._earlier = [EngineCounters() for _ in self.engines]
        self.restarts = 0

    def _extra_args(self, index: int) -> tuple[str, ...]:
        if not self.relays:
            return ()
        config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.relays[index].inbound,
            "topic": f"kv@engine-{index}",
        }
        return ("--kv-events-config", json.dumps(config), "--enable-scale-out")

    @property
    def urls(self) -> list[str]:
        """Base URLs, in engine order."""
        return [engine.url for engine in self.engines]

    @property
    def pgids(self) -> list[int]:
        """Process group ids of the started engines (each engine is one group)."""
        return [engine.pid for engine in self.engines if engine.pid is not None]

    @property
    def event_endpoints(self) -> dict[str, str]:
        """Engine URL -> its ZMQ KV event endpoint (empty without `kv_events`)."""
        return {engine.url: relay.outbound for engine, relay in zip(self.engines, self.relays)}

    async def start(self, timeout: float) -> list[float]:
        """Start every engine and wait until all answer /health.

        Returns:
            Seconds each took.

        Raises:
            kvgate.engines.EngineError: one failed; all are stopped then.
        """
        for relay in self.relays:
            relay.start()
        return await start_engines(self.engines, timeout=timeout)

    def stop(self) -> None:
        """Stop every engine and event relay (safe to call twice)."""
        stop_engines(self.engines, grace=10.0)
        for relay in self.relays:
            relay.stop()

    async def counters(self, http: aiohttp.ClientSession) -> list[EngineCounters]:
        """Each engine's counters now.

        Raises:
            FleetError: an engine did not answer /metrics with 200.
        """

        return list(await asyncio.gather(*(self._counters(http, i) for i in range(len(self.engines)))))

    async def _counters(self, http: aiohttp.ClientSession, index: int) -> EngineCounters:
        url = self.engines[index].url
        async with http.get(f"{url}/metrics") as response:
            if response.status != 200:
                raise FleetError(f"{url}/metrics answered {response.status}")
            return parse_counters(await response.text()).plus(self._earlier[index])

    async def restart(self, http: aiohttp.ClientSession, index: int, timeout: float) -> float:
        """Kill engine `index` (SIGKILL to its process group, as a crash) and start it again on its port.

        What it had counted is carried into `counters` first. Requests it
        was serving fail; the routers must send around it until it is back.

        Args:
            http: client for its /metrics.
            index: which engine.
            timeout: seconds it may take to answer /health again.

        Returns:
            Seconds from the kill until it was ready again.

        Raises:
            kvgate.engines.EngineError: it did not come back.
        """
        old = self.engines[index]
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, FleetError):
            self._earlier[index] = await self._counters(http, index)
        started = time.monotonic()
        old.signal(signal.SIGKILL)
        await asyncio.to_thread(old.stop, 5.0)
        new = Engine(old.spec, log_path=old.log_path)
        self.engines[index] = new
        new.start()
        await new.wait_ready(timeout)
        self.restarts += 1
        return time.monotonic() - started

    async def wait_idle(self, http: aiohttp.ClientSession, timeout: float = 180.0) -> None:
        """Wait until no engine runs or queues a request (aborted streams drain too).

        Raises:
            FleetError: still busy after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            busy = [c.running + c.waiting for c in await self.counters(http)]
            if not any(busy):
                return
            if time.monotonic() >= deadline:
                raise FleetError(f"engines still busy after {timeout:.0f} s: {busy}")
            await asyncio.sleep(0.2)

    async def reset_prefix_caches(self, http: aiohttp.ClientSession, attempts: int = 5) -> None:
        """Empty every engine's prefix cache; wait for idle engines first.

        Raises:
            FleetError: an engine did not answer 200 with success true
                (it needs `VLLM_SERVER_DEV_MODE=1`, which `kvgate.engines` sets).
        """
        for url in self.urls:
            for attempt in range(attempts):
                await self.wait_idle(http)
                async with http.post(f"{url}/reset_prefix_cache") as response:
                    text = await response.text()
                    if response.status != 200:
                        raise FleetError(f"{url}/reset_prefix_cache answered {response.status}: {text[:200]}")
                    if json.loads(text or "{}").get("success", True):
                        break
                await asyncio.sleep(0.5 * (attempt + 1))
            else:
                raise FleetError(f"{url}/reset_prefix_cache kept answering success=false")

    async def warm_up(self, http: aiohttp.ClientSession, prompt: str, rounds: int = 2) -> None:
        """Send a few requests straight to each engine, so no run pays first-request costs.

        Raises:
            FleetError: an engine answered anything but 200.
        """
        body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 8, "ignore_eos": True}
        for _ in range(rounds):
            for url in self.urls:
                async with http.post(f"{url}/v1/completions", json=body) as response:
                    if response.status != 200:
                        raise FleetError(
                            f"warm-up at {url} answered {response.status}: {(await response.text())[:200]}"
                        )
                    await response.read()


def total(counters: Sequence[EngineCounters]) -> EngineCounters:
    """Sum of several engines' counters and gauges."""
    return EngineCounters(**{f.name: sum(getattr(c, f.name) for c in counters) for f in fields(EngineCounters)})
