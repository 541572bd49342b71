"""The benchmark's orchestration: every router on every workload and engine set, then the overhead.

`run_bench`:

1. builds each workload from the seed (the model's tokenizer measures text);
2. for each block of `engine_sets.schedule` (per repeat, each engine set in
   turn, the routers in an order shifted each repeat): has the engine set
   running (`engine_sets.EngineSets`: plain engines start once and are
   reused, shared-cache engines start anew for every run) and warmed up;
3. for each workload, for each router: resets the engines' prefix caches
   (failing loudly if an engine refuses), starts the router and waits until it
   routes, snapshots the engines' counters, replays the workload (restarting
   one engine partway when the workload asks, `Workload.restart_after`),
   waits until the engines are idle, snapshots again, keeps the router's own
   figures and who used the CPUs during the replay (`cpu`), stops the router
   and summarises (`summary`). Workloads are inside the engine set, so the
   routers compared on one workload run close together in time;
4. stops the engines, then measures each gateway against the stub engine
   (`overhead`), so no engine competes for the CPUs.

A router that fails to start or to become ready is recorded as a failed run
and the others go on; an engine that fails stops the whole benchmark.

Called by `kvgate.bench.cli`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.bench import cpu
from kvgate.bench.bound import hit_bound
from kvgate.bench.config import BenchConfig
from kvgate.bench.cpu import CpuUse
from kvgate.bench.engine_sets import EngineSets, row_label, schedule
from kvgate.bench.fleet import EngineFleet, FleetSpec
from kvgate.bench.load import RequestRecord, run_workload
from kvgate.bench.overhead import OverheadReport, measure_overhead
from kvgate.bench.replicas import DEFAULT_STATE_URL, RouterGroup
from kvgate.bench.routers import LaunchContext, RouterError, RouterSpec
from kvgate.bench.summary import RunSummary, summarize
from kvgate.bench.workloads import BenchRequest, Workload, build_workload
from kvgate.model import SERVED_MODEL_NAME
from router.prompts import PromptEncoder

#: A prompt long enough to fill a few KV blocks, sent to warm the engines up.
_WARMUP_PROMPT = "Warm up the engine with a prompt that spans several blocks. " * 60

#: The engine a workload's mid-run restart kills.
_RESTARTED_ENGINE = 0


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """One router on one workload and engine set: its summary (or why there is none) and every request's record.

    Attributes:
        engine_set: `plain` or `shared` (`engine_sets`).
        restart_s: seconds the engine restarted mid-run took to serve
            again; None when the workload restarts none.
    """

    router: str
    workload: str
    started_at: str
    summary: RunSummary | None = None
    error: str | None = None
    records: tuple[RequestRecord, ...] = ()
    cpu: CpuUse | None = None
    repeat: int = 0
    engine_set: str = "plain"
    restart_s: float | None = None


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """What the report says about a workload.

    Attributes:
        name: registry name.
        description: one line.
        params: its sizes.
        sessions: sessions in the trace.
        requests: requests in the trace (a timed workload sends only some).
        duration_s: how long a timed workload sends; None otherwise.
        bound_nominal: the hit-rate bound of the whole trace in session
            order; None for timed workloads, whose sent requests differ per run.
    """

    name: str
    description: str
    params: dict[str, Any]
    sessions: int
    requests: int
    duration_s: float | None
    bound_nominal: float | None


@dataclass(frozen=True, slots=True)
class BenchResults:
    """Everything one benchmark produced."""

    config: BenchConfig
    repeats: int
    routers: tuple[str, ...]
    workloads: tuple[WorkloadInfo, ...]
    runs: tuple[RunOutcome, ...]
    overhead: OverheadReport | None
    overhead_error: str | None
    engine_ready_s: tuple[float, ...]
    started_at: str
    finished_at: str
    engine_sets: tuple[str, ...] = ("plain",)

    @property
    def complete(self) -> bool:
        """Every run produced a summary and every overhead measurement succeeded."""
        runs_ok = all(run.summary is not None for run in self.runs)
        overhead_ok = self.overhead_error is None and (self.overhead is None or not self.overhead.failures)
        return runs_ok and overhead_ok


class Progress:
    """What the runner reports as it goes (the CLI draws it with tqdm)."""

    def start(self, total: int) -> None:
        """`total` steps are coming."""

    def step(self, label: str) -> None:
        """A step begins."""

    def advance(self) -> None:
        """A step ended."""

    def request(self, record: RequestRecord) -> None:
        """A request finished within the current step."""

    def close(self) -> None:
        """Nothing more is coming."""


class TokenCache:
    """Prompt token ids per request id, computed once with the engine's tokenization."""

    def __init__(self, encoder: PromptEncoder) -> None:
        self._encoder = encoder
        self._tokens: dict[str, list[int]] = {}

    def __call__(self, request: BenchRequest) -> list[int]:
        tokens = self._tokens.get(request.id)
        if tokens is None:
            tokens = self._tokens[request.id] = self._encoder.encode_chat(request.chat())
        return tokens


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


async def _run_one(
    fleet: EngineFleet,
    router_spec: RouterSpec,
    workload: Workload,
    config: BenchConfig,
    ctx: LaunchContext,
    tokens: TokenCache,
    http: aiohttp.ClientSession,
    progress: Progress,
    repeat: int,
    state_url: str,
) -> RunOutcome:
    started = _now()
    engine_set = fleet.spec.name
    router = RouterGroup(router_spec, ctx, state_url=state_url)
    restart: asyncio.Task[float] | None = None
    finished = 0

    def on_record(record: RequestRecord) -> None:
        nonlocal finished, restart
        progress.request(record)
        finished += 1
        if restart is None and workload.restart_after is not None and finished >= workload.restart_after:
            restart = asyncio.create_task(fleet.restart(http, _RESTARTED_ENGINE, config.engine_start_timeout_s))

    try:
        await fleet.reset_prefix_caches(http)
        router.start()
        await router.wait_ready(http)
        await fleet.reset_prefix_caches(http)
        before = await fleet.counters(http)
        cpu_before = cpu.sample(fleet.pgids, router.pids)
        try:
            trace = await run_workload(
                router.urls,
                workload,
                model=SERVED_MODEL_NAME,
                request_timeout_s=config.request_timeout_s,
                on_record=on_record,
            )
            cpu_use = cpu.between(cpu_before, cpu.sample(fleet.pgids, router.pids))
        finally:
            # An engine being restarted is waited for even when the replay failed.
            restart_s = None if restart is None else await restart
        await fleet.wait_idle(http)
        await asyncio.sleep(0.5)  # the engines' counters trail the last answer by a step
        after = await fleet.counters(http)
        router_metrics = await router.scrape(http)
    except RouterError as exc:
        return RunOutcome(
            router=router_spec.name,
            workload=workload.name,
            started_at=started,
            error=str(exc),
            repeat=repeat,
            engine_set=engine_set,
        )
    finally:
        router.stop()
    summary = summarize(
        workload,
        trace,
        [a.since(b) for a, b in zip(after, before)],
        tokens_of=tokens,
        block_size=config.block_size,
        router_metrics=router_metrics,
    )
    return RunOutcome(
        router=router_spec.name,
        workload=workload.name,
        started_at=started,
        summary=summary,
        records=trace.records,
        cpu=cpu_use,
        repeat=repeat,
        engine_set=engine_set,
        restart_s=restart_s,
    )


def _info(workload: Workload, tokens: TokenCache, block_size: int) -> WorkloadInfo:
    nominal = None
    if workload.duration_s is None:
        nominal = hit_bound((tokens(r) for r in workload.requests()), block_size).rate
    return WorkloadInfo(
        name=workload.name,
        description=workload.description,
        params=dict(workload.params),
        sessions=len(workload.sessions),
        requests=sum(len(s.requests) for s in workload.sessions),
        duration_s=workload.duration_s,
        bound_nominal=nominal,
    )


def fleet_spec(
    config: BenchConfig,
    routers: Sequence[RouterSpec],
    *,
    model_dir: Path,
    log_dir: Path,
    engine_args: Sequence[str] = (),
    kvgate_kv_events: bool = True,
) -> FleetSpec:
    """The engines every router of a run replays its workloads on.

    They publish KV events when a router reads them: vllm-router's
    `kv_aware` always, kvgate's routers unless `kvgate_kv_events` is off.
    """
    return FleetSpec(
        model_dir=model_dir,
        engines=config.engines,
        kv_blocks=config.kv_blocks,
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        kv_events=any(r.needs_kv_events for r in routers)
        or (kvgate_kv_events and any(r.family == "kvgate" for r in routers)),
        log_dir=log_dir,
        engine_args=tuple(engine_args),
    )


async def run_bench(
    config: BenchConfig,
    *,
    routers: Sequence[RouterSpec],
    workload_names: Sequence[str],
    overhead_routers: Sequence[RouterSpec],
    model_dir: Path,
    encoder: PromptEncoder,
    log_dir: Path,
    kvgate_args: Sequence[str] = (),
    engine_args: Sequence[str] = (),
    kvgate_kv_events: bool = True,
    repeats: int = 1,
    progress: Progress | None = None,
    on_engines: Callable[[list[str]], None] | None = None,
    state_url: str = DEFAULT_STATE_URL,
    engine_sets: Sequence[str] = ("plain",),
) -> BenchResults:
    """Run the benchmark (see the module docstring).

    Args:
        config: sizes.
        routers: routers to compare on the engines.
        workload_names: workloads to replay (empty: no engines are started).
        overhead_routers: gateways to measure against the stub (empty: skipped).
        model_dir: the tiny model's directory.
        encoder: its tokenizer (the engines' tokenization).
        log_dir: where engine, router and stub logs go.
        kvgate_args: extra `kvgate serve` arguments.
        engine_args: extra arguments for every vLLM engine.
        kvgate_kv_events: feed kvgate the engines' KV events (the engines
            then publish them; they also do when vllm-router's `kv_aware` runs).
        repeats: times every router replays every workload on every engine
            set; each repeat starts one engine set and one router further down
            their lists (`engine_sets.schedule`), so none always runs first.
        progress: progress display.
        on_engines: called with the engine URLs once they are ready.
        state_url: the Redis that kvgate replicas with shared state (`+state`) meet in.
        engine_sets: `plain` and/or `shared` (`engine_sets`): the engines
            every router runs on.

    Returns:
        The results.

    Raises:
        kvgate.engines.EngineError: an engine failed to start or died.
        kvgate.bench.fleet.FleetError: an engine refused to reset or drain.
        TimeoutError: a cache node of the shared set did not start.
    """
    progress = progress or Progress()
    started_at = _now()
    tokens = TokenCache(encoder)
    workloads = [build_workload(name, config.sizes, config.seed, encoder) for name in workload_names]
    infos = tuple(_info(w, tokens, config.block_size) for w in workloads)
    runs: list[RunOutcome] = []
    ready: list[float] = []
    engine_steps = repeats * len(engine_sets) * len(workloads) * len(routers) if routers else 0
    overhead_steps = len(overhead_routers) + 1 if overhead_routers else 0
    progress.start(engine_steps + overhead_steps)
    try:
        if engine_steps:
            sets = EngineSets(
                fleet_spec(
                    config,
                    routers,
                    model_dir=model_dir,
                    log_dir=log_dir,
                    engine_args=engine_args,
                    kvgate_kv_events=kvgate_kv_events,
                ),
                start_timeout_s=config.engine_start_timeout_s,
                cache_nodes=config.cache_nodes,
            )
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                    for block in schedule(len(routers), engine_sets, repeats):
                        for workload in workloads:
                            for index in block.order:
                                router_spec = routers[index]
                                label = f"{workload.name} / {row_label(router_spec.name, block.engine_set)}"
                                progress.step(f"starting {config.engines} {block.engine_set} vLLM engines")
                                fleet, started = await sets.use(block.engine_set, http, _WARMUP_PROMPT)
                                if started:
                                    ready += sets.ready_s
                                    if on_engines is not None:
                                        on_engines(fleet.urls)
                                progress.step(label if repeats == 1 else f"{label} ({block.repeat + 1}/{repeats})")
                                ctx = LaunchContext(
                                    worker_urls=tuple(fleet.urls),
                                    model_dir=model_dir,
                                    log_dir=log_dir,
                                    kv_event_endpoints=fleet.event_endpoints,
                                    block_size=config.block_size,
                                    kvgate_args=tuple(kvgate_args),
                                    kvgate_kv_events=kvgate_kv_events,
                                )
                                runs.append(
                                    await _run_one(
                                        fleet, router_spec, workload, config, ctx, tokens, http, progress,
                                        block.repeat, state_url,
                                    )
                                )  # fmt: skip
                                progress.advance()
            finally:
                await asyncio.to_thread(sets.stop)
        overhead = overhead_error = None
        if overhead_routers:
            steps_begun = 0

            def overhead_step(label: str) -> None:
                nonlocal steps_begun
                if steps_begun:
                    progress.advance()
                steps_begun += 1
                progress.step(label)

            try:
                overhead = await measure_overhead(
                    overhead_routers,
                    config.overhead,
                    model_dir=model_dir,
                    log_dir=log_dir,
                    on_step=overhead_step,
                    state_url=state_url,
                )
            except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
                overhead_error = f"{type(exc).__name__}: {exc}"
            progress.advance()
    finally:
        progress.close()
    return BenchResults(
        config=config,
        repeats=repeats,
        routers=tuple(r.name for r in routers),
        workloads=infos,
        runs=tuple(runs),
        overhead=overhead,
        overhead_error=overhead_error,
        engine_ready_s=tuple(ready),
        started_at=started_at,
        finished_at=_now(),
        engine_sets=tuple(engine_sets),
    )
