"""Gateway replicas against one gateway: the ratios the report's "Gateway replicas" section shows.

For every workload, each row that ran several replicas (`*N`) is set against
the single router of the same family and policy: its engine hit rate and TTFT
p50 as ratios of the single router's, the spread of requests over the engines
(max minus min over mean) of both, and on timed fairness workloads the light
users' share of both. From the stub benchmark, the latency that sharing
routing state adds: a `+state` gateway's added p50 and p99 minus the same
gateway's without.

Pure functions of `BenchResults`; called by `kvgate.bench.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvgate.bench.aggregate import rows
from kvgate.bench.overhead import OverheadReport
from kvgate.bench.routers import RouterSpec
from kvgate.bench.runner import BenchResults
from kvgate.bench.summary import EngineShare, RunSummary

#: Targets for replicas against one gateway (shown beside the ratios, never asserted).
HIT_RATIO_TARGET = 0.95
TTFT_RATIO_TARGET = 1.1
SPREAD_MARGIN = 0.10


@dataclass(frozen=True, slots=True)
class ReplicaComparison:
    """A group of replicas on one workload against the single router.

    Attributes:
        workload: the workload.
        router: the group (`family:policy*N[+state]`).
        single: the router it is set against (`family:policy`).
        hit_ratio: engine hit rate, group / single; None when the single router hit nothing.
        ttft_ratio: TTFT p50, group / single.
        spread: the group's requests-per-engine spread ((max - min) / mean).
        single_spread: the single router's.
        light_share: the light users' share under the group (fairness workloads).
        single_light_share: under the single router.
    """

    workload: str
    router: str
    single: str
    hit_ratio: float | None
    ttft_ratio: float | None
    spread: float | None
    single_spread: float | None
    light_share: float | None
    single_light_share: float | None


@dataclass(frozen=True, slots=True)
class SharingCost:
    """What sharing routing state adds per request on the stub benchmark, in ms.

    Attributes:
        router: the gateway with shared state (`+state`).
        single: the same gateway without.
        added_p50_ms / added_p99_ms: its added latency minus the other's, per percentile.
        added_cpu_ms: its CPU time per request minus the other's (None when either is unknown).
    """

    router: str
    single: str
    added_p50_ms: float
    added_p99_ms: float
    added_cpu_ms: float | None = None


def spread(engines: Sequence[EngineShare]) -> float | None:
    """(max - min) / mean of the requests each engine finished; None without engines or requests."""
    counts = [e.requests for e in engines]
    if not counts or sum(counts) <= 0:
        return None
    mean = sum(counts) / len(counts)
    return (max(counts) - min(counts)) / mean


def _ratio(value: float, base: float) -> float | None:
    return value / base if base > 0 else None


def _single_name(name: str) -> str | None:
    try:
        spec = RouterSpec.parse(name)
    except ValueError:
        return None
    return spec.single.name if spec.replicas > 1 or spec.shared_state else None


def compare(results: BenchResults) -> list[ReplicaComparison]:
    """Every replica group on every workload against its single router (when both have figures)."""
    out: list[ReplicaComparison] = []
    for info in results.workloads:
        by_name: dict[str, RunSummary] = {
            r.router: r.summary for r in rows(results, info.name) if r.summary and r.engine_set == "plain"
        }
        for name, summary in by_name.items():
            single = _single_name(name)
            if single is None or RouterSpec.parse(name).replicas == 1 or single not in by_name:
                continue
            base = by_name[single]
            out.append(
                ReplicaComparison(
                    workload=info.name,
                    router=name,
                    single=single,
                    hit_ratio=_ratio(summary.hit_rate, base.hit_rate),
                    ttft_ratio=_ratio(summary.ttft_ms_p50, base.ttft_ms_p50),
                    spread=spread(summary.engines),
                    single_spread=spread(base.engines),
                    light_share=summary.light_share,
                    single_light_share=base.light_share,
                )
            )
    return out


def sharing_costs(overhead: OverheadReport | None) -> list[SharingCost]:
    """Each `+state` gateway's added latency minus the same gateway's without shared state."""
    if overhead is None:
        return []
    by_name = {g.router: g for g in overhead.gateways}
    out = []
    for name, gateway in by_name.items():
        single = _single_name(name)
        if single is None or not RouterSpec.parse(name).shared_state or single not in by_name:
            continue
        base = by_name[single]
        out.append(
            SharingCost(
                router=name,
                single=single,
                added_p50_ms=gateway.added_ms_p50 - base.added_ms_p50,
                added_p99_ms=gateway.added_ms_p99 - base.added_ms_p99,
                added_cpu_ms=(
                    None
                    if gateway.cpu_ms_per_request is None or base.cpu_ms_per_request is None
                    else gateway.cpu_ms_per_request - base.cpu_ms_per_request
                ),
            )
        )
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_lines(results: BenchResults) -> list[str]:
    """The "Gateway replicas" section, or nothing when no replica group or `+state` gateway ran."""
    comparisons = compare(results)
    costs = sharing_costs(results.overhead)
    if not comparisons and not costs:
        return []
    lines = ["", "## Gateway replicas", ""]
    if comparisons:
        lines += [
            (
                "Each request went to the next replica in turn. Ratios are against the single router of the same "
                f"family and policy, in this run (targets for kvgate with shared state: hit rate >= "
                f"{HIT_RATIO_TARGET}, TTFT p50 <= {TTFT_RATIO_TARGET}, spread within {SPREAD_MARGIN:.2f} of one "
                "replica's). Spread: requests per engine, (max - min) / mean."
            ),
            "",
            "| workload | replicas | against | hit rate ratio | TTFT p50 ratio | spread | its spread | light share | its light share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in comparisons:
            lines.append(
                f"| {c.workload} | {c.router} | {c.single} | {_fmt(c.hit_ratio, 3)} | {_fmt(c.ttft_ratio)} | "
                f"{_fmt(c.spread)} | {_fmt(c.single_spread)} | {_fmt(c.light_share, 3)} | "
                f"{_fmt(c.single_light_share, 3)} |"
            )
    if costs:
        lines += [
            *([""] if comparisons else []),
            "Latency sharing routing state adds per request (stub engine, sequential requests): the `+state` "
            "gateway's added latency minus the same gateway's without; and its CPU time per request minus the "
            "other's (the gateway's processes, from /proc, over the same requests).",
            "",
            "| gateway | against | sharing adds p50 ms | sharing adds p99 ms | sharing adds CPU ms |",
            "| --- | --- | --- | --- | --- |",
        ]
        for cost in costs:
            lines.append(
                f"| {cost.router} | {cost.single} | {cost.added_p50_ms:.3f} | {cost.added_p99_ms:.3f} | "
                f"{_fmt(cost.added_cpu_ms, 3)} |"
            )
    return lines
