"""One run's figures: what the client timed, what the engines counted, what the trace allowed.

`summarize` turns a `RunTrace` (from `load`), the engines' counter deltas
(from `fleet`) and the workload into a `RunSummary`:

- hit rate as the engines report it: `sum(hits) / sum(queries)` of the
  deltas of `vllm:prefix_cache_{hits,queries}_total` over the run;
- the trace's upper bound (`bound`), replaying the prompts in the order they
  were sent, and the ratio of the two;
- prefill work: prompt tokens the engines computed themselves (vLLM's
  `vllm:prompt_tokens_by_source{source="local_compute"}`: prompt tokens less
  those from their own cache and those loaded from the shared KV cache), the
  tokens loaded from the shared cache (`vllm:external_prefix_cache_hits`),
  and the least prefill the trace allows (its prompt tokens less the bound's
  hits: one infinite cache shared by all engines);
- TTFT and end-to-end latency percentiles of the successful requests, and
  where a request's time went on the engines: mean queue, prefill and decode
  time and the engine's own TTFT (client TTFT minus engine TTFT is the time
  spent in the router and on the wire);
- for routers that name the serving engine (kvgate's `x-kvgate-pod`), over
  how many engines each user's requests were spread;
- throughput: successful requests and generated tokens per second of wall
  time (of the duration, for timed workloads);
- per-user service in VTC cost units (1 x prompt + 2 x generated tokens, as
  kvgate's admission queue counts it), Jain's index over users, and for
  workloads with light users their share, the equal share and VTC's floor.
  For timed workloads only requests finished within the duration count; for
  the others every request counts, so service there mirrors the trace.

Pure: no I/O. Called by `kvgate.bench.runner`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvgate.bench.bound import hit_bound
from kvgate.bench.fleet import EngineCounters, total
from kvgate.bench.load import RequestRecord, RunTrace
from kvgate.bench.stats import jain_index, percentile, vtc_light_share_floor
from kvgate.bench.workloads import BenchRequest, Workload

#: VTC weights of kvgate's admission queue: cost of a prompt token and of a generated token.
INPUT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0

_FAILURE_SAMPLES = 3


@dataclass(frozen=True, slots=True)
class EngineShare:
    """One engine's part of a run (counter deltas).

    Attributes:
        requests: requests it finished.
        prompt_tokens: prompt tokens it received.
        prefix_queries: prompt tokens it looked up.
        prefix_hits: of those, tokens it served from its cache.
        hit_rate: hits / queries.
        preemptions: requests it preempted for lack of KV blocks.
        external_hits: prompt tokens it loaded from the shared KV cache.
        prefill_computed: prompt tokens it computed itself.
    """

    requests: float
    prompt_tokens: float
    prefix_queries: float
    prefix_hits: float
    hit_rate: float
    preemptions: float
    external_hits: float = 0.0
    prefill_computed: float = 0.0


@dataclass(frozen=True, slots=True)
class RunSummary:
    """Figures of one router on one workload. Times in milliseconds, rates per second."""

    requests_sent: int
    requests_ok: int
    requests_failed: int
    failure_samples: tuple[str, ...]
    wall_s: float
    hit_rate: float
    hit_rate_bound: float
    hit_rate_vs_bound: float
    engine_prefix_queries: float
    engine_prefix_hits: float
    bound_hit_tokens: int
    bound_prompt_tokens: int
    ttft_ms_p50: float
    ttft_ms_p90: float
    ttft_ms_p99: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    throughput_rps: float
    output_tokens_per_s: float
    mean_output_tokens: float
    preemptions: float
    ttft_ms_mean: float
    engine_ttft_ms_mean: float
    engine_queue_ms_mean: float
    engine_prefill_ms_mean: float
    engine_decode_ms_mean: float
    pods_per_user: float | None
    service_window_s: float
    service_by_user: Mapping[str, float]
    jain_index: float
    light_share: float | None
    light_share_fair: float | None
    light_share_vtc_floor: float | None
    exhausted_sessions: int
    engines: tuple[EngineShare, ...] = ()
    router_metrics: Mapping[str, float] = field(default_factory=dict)
    prefill_tokens_computed: float = 0.0
    external_hit_tokens: float = 0.0
    min_prefill_tokens: int = 0


def _ms(values: Sequence[float], q: float) -> float:
    return percentile(values, q) * 1000.0 if values else math.nan


def _service(record: RequestRecord, prompt_tokens: int) -> float:
    prompt = record.prompt_tokens if record.prompt_tokens is not None else prompt_tokens
    return INPUT_WEIGHT * prompt + OUTPUT_WEIGHT * (record.completion_tokens or 0)


def summarize(
    workload: Workload,
    trace: RunTrace,
    engine_deltas: Sequence[EngineCounters],
    *,
    tokens_of: Callable[[BenchRequest], Sequence[int]],
    block_size: int,
    router_metrics: Mapping[str, float] | None = None,
) -> RunSummary:
    """Figures of one run.

    Args:
        workload: what was replayed.
        trace: what the client recorded.
        engine_deltas: each engine's counters over the run (`EngineCounters.since`).
        tokens_of: the prompt token ids of a request (the engine's tokenization).
        block_size: the engines' KV block size.
        router_metrics: the router's own figures, kept as they are.

    Returns:
        The summary.
    """
    requests = workload.by_id()
    sent = trace.in_send_order()
    ok = [r for r in trace.records if r.ok]
    failed = [r for r in trace.records if not r.ok]

    bound = hit_bound((tokens_of(requests[r.request_id]) for r in sent), block_size)
    engines = total(engine_deltas)
    hit_rate = engines.hit_rate

    window = workload.duration_s if workload.duration_s is not None else trace.wall_s
    counted = [r for r in ok if workload.duration_s is None or r.done_s <= workload.duration_s]
    service = dict.fromkeys(workload.users, 0.0)
    for record in counted:
        service[record.user] += _service(record, len(tokens_of(requests[record.request_id])))

    light_share = fair = floor = None
    if workload.light_users:
        all_service = sum(service.values())
        light = sum(service[u] for u in workload.light_users)
        light_share = light / all_service if all_service else 0.0
        fair = len(workload.light_users) / len(service)
        biggest = max(
            (
                INPUT_WEIGHT * len(tokens_of(requests[r.request_id]))
                + OUTPUT_WEIGHT * requests[r.request_id].max_tokens
                for r in sent
            ),
            default=0.0,
        )
        floor = vtc_light_share_floor(all_service, len(workload.light_users), biggest)

    generated = sum(r.completion_tokens or 0 for r in counted)
    finished = engines.requests

    def engine_ms(seconds: float) -> float:
        return seconds / finished * 1000.0 if finished else math.nan

    pods: dict[str, set[str]] = {}
    for record in ok:
        if record.pod is not None:
            pods.setdefault(record.user, set()).add(record.pod)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return RunSummary(
        requests_sent=len(trace.records),
        requests_ok=len(ok),
        requests_failed=len(failed),
        failure_samples=tuple(dict.fromkeys(r.error or f"HTTP {r.status}" for r in failed))[:_FAILURE_SAMPLES],
        wall_s=trace.wall_s,
        hit_rate=hit_rate,
        hit_rate_bound=bound.rate,
        hit_rate_vs_bound=hit_rate / bound.rate if bound.rate else math.nan,
        engine_prefix_queries=engines.prefix_queries,
        engine_prefix_hits=engines.prefix_hits,
        bound_hit_tokens=bound.hit_tokens,
        bound_prompt_tokens=bound.prompt_tokens,
        ttft_ms_p50=_ms(ttfts, 50),
        ttft_ms_p90=_ms(ttfts, 90),
        ttft_ms_p99=_ms(ttfts, 99),
        latency_ms_p50=_ms([r.latency_s for r in ok], 50),
        latency_ms_p90=_ms([r.latency_s for r in ok], 90),
        latency_ms_p99=_ms([r.latency_s for r in ok], 99),
        throughput_rps=len(counted) / window if window > 0 else 0.0,
        output_tokens_per_s=generated / window if window > 0 else 0.0,
        mean_output_tokens=generated / len(counted) if counted else 0.0,
        preemptions=engines.preemptions,
        ttft_ms_mean=sum(ttfts) / len(ttfts) * 1000.0 if ttfts else math.nan,
        engine_ttft_ms_mean=engine_ms(engines.ttft_s),
        engine_queue_ms_mean=engine_ms(engines.queue_s),
        engine_prefill_ms_mean=engine_ms(engines.prefill_s),
        engine_decode_ms_mean=engine_ms(engines.decode_s),
        pods_per_user=sum(len(p) for p in pods.values()) / len(pods) if pods else None,
        service_window_s=window,
        service_by_user=service,
        jain_index=jain_index(list(service.values())),
        light_share=light_share,
        light_share_fair=fair,
        light_share_vtc_floor=floor,
        exhausted_sessions=trace.exhausted_sessions,
        engines=tuple(
            EngineShare(
                requests=d.requests,
                prompt_tokens=d.prompt_tokens,
                prefix_queries=d.prefix_queries,
                prefix_hits=d.prefix_hits,
                hit_rate=d.hit_rate,
                preemptions=d.preemptions,
                external_hits=d.external_hits,
                prefill_computed=d.prefill_computed,
            )
            for d in engine_deltas
        ),
        router_metrics=dict(router_metrics or {}),
        prefill_tokens_computed=engines.prefill_computed,
        external_hit_tokens=engines.external_hits,
        min_prefill_tokens=bound.prompt_tokens - bound.hit_tokens,
    )
