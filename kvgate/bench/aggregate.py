"""One row per router, engine set and workload: the median over repeated runs.

With `--repeat N` every router replays every workload N times on each engine
set. On a small shared machine one run's TTFT can move by half between
repeats, so the tables and plots show, per router and engine set, the median
of each figure over its successful repeats (request counts and failures are
summed) with the range (min-max) of the figures most compared: hit rate,
TTFT p50 and p90, and prefill tokens computed (`SPREAD_FIGURES`). With one
repeat a row is that run.

Called by `kvgate.bench.report`; pure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from kvgate.bench.engine_sets import row_label
from kvgate.bench.runner import BenchResults, RunOutcome
from kvgate.bench.stats import Spread, spread
from kvgate.bench.summary import RunSummary

#: RunSummary fields that count things over a run: summed over repeats, not medianed.
SUMMED = frozenset(
    {
        "requests_sent",
        "requests_ok",
        "requests_failed",
        "engine_prefix_queries",
        "engine_prefix_hits",
        "bound_hit_tokens",
        "bound_prompt_tokens",
        "preemptions",
        "exhausted_sessions",
    }
)

#: RunSummary figures whose spread over repeats the rows carry.
SPREAD_FIGURES: tuple[str, ...] = ("hit_rate", "ttft_ms_p50", "ttft_ms_p90", "prefill_tokens_computed")


@dataclass(frozen=True, slots=True)
class RouterRow:
    """A router's figures on one workload and engine set.

    Attributes:
        router: `family:policy`.
        summary: medians over the successful repeats; None if none succeeded.
        repeats_ok: successful repeats.
        errors: why the other repeats failed.
        hit_rate_range: (min, max) over repeats.
        ttft_p50_range: (min, max) TTFT p50 over repeats, ms.
        router_cpu_ms: median CPU milliseconds of the router process per request.
        router_wait_ms: median milliseconds per request the router's threads
            waited for a core (run-queue wait).
        others_cpu_share: median share of the cores used outside the benchmark.
        engine_set: the engines it ran on (`plain`, `shared`).
        spreads: median and range over repeats of each of `SPREAD_FIGURES`
            (absent when no repeat produced the figure).
        restart_s: median seconds the engine restarted mid-run took to come back.
    """

    router: str
    summary: RunSummary | None
    repeats_ok: int
    errors: tuple[str, ...]
    hit_rate_range: tuple[float, float] | None
    ttft_p50_range: tuple[float, float] | None
    router_cpu_ms: float | None
    others_cpu_share: float | None
    engine_set: str = "plain"
    spreads: dict[str, Spread] = field(default_factory=dict)
    restart_s: float | None = None
    router_wait_ms: float | None = None

    @property
    def label(self) -> str:
        """The row's name in tables: the router, with `@set` on other than plain engines."""
        return row_label(self.router, self.engine_set)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def combine(summaries: Sequence[RunSummary]) -> RunSummary:
    """Medians of several runs' summaries (counts summed; other fields from the median-TTFT run).

    Raises:
        ValueError: no summaries.
    """
    if not summaries:
        raise ValueError("nothing to combine")
    if len(summaries) == 1:
        return summaries[0]
    by_ttft = sorted(summaries, key=lambda s: s.ttft_ms_p50)
    middle = by_ttft[(len(by_ttft) - 1) // 2]
    values = {}
    for f in fields(RunSummary):
        column = [getattr(s, f.name) for s in summaries]
        if f.name in SUMMED:
            values[f.name] = sum(column)
        elif all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in column):
            values[f.name] = _median(column)
        else:
            values[f.name] = getattr(middle, f.name)
    return RunSummary(**values)


def _per_request_ms(run: RunOutcome, seconds: float | None) -> float | None:
    if seconds is None or run.summary is None or not run.summary.requests_sent:
        return None
    return seconds / run.summary.requests_sent * 1000.0


def _spreads(summaries: Sequence[RunSummary]) -> dict[str, Spread]:
    found = {name: spread([float(getattr(s, name)) for s in summaries]) for name in SPREAD_FIGURES}
    return {name: value for name, value in found.items() if value is not None}


def runs_of(results: BenchResults, workload: str, router: str, engine_set: str) -> list[RunOutcome]:
    """Every repeat of `router` on `workload` and `engine_set`, failed ones included, in the order they ran."""
    return [r for r in results.runs if r.workload == workload and r.router == router and r.engine_set == engine_set]


def rows(results: BenchResults, workload: str) -> list[RouterRow]:
    """One row per router and engine set that ran `workload`: engine sets in their order, routers within each."""
    out = []
    for engine_set in results.engine_sets:
        for router in results.routers:
            runs = runs_of(results, workload, router, engine_set)
            if not runs:
                continue
            ok = [r for r in runs if r.summary is not None]
            summaries = [r.summary for r in ok if r.summary is not None]
            out.append(
                RouterRow(
                    router=router,
                    summary=combine(summaries) if summaries else None,
                    repeats_ok=len(ok),
                    errors=tuple(r.error or "" for r in runs if r.summary is None),
                    hit_rate_range=(min(s.hit_rate for s in summaries), max(s.hit_rate for s in summaries))
                    if summaries
                    else None,
                    ttft_p50_range=(min(s.ttft_ms_p50 for s in summaries), max(s.ttft_ms_p50 for s in summaries))
                    if summaries
                    else None,
                    router_cpu_ms=_median([_per_request_ms(r, r.cpu.router_s if r.cpu else None) for r in ok]),
                    others_cpu_share=_median([r.cpu.others_share if r.cpu else None for r in ok]),
                    engine_set=engine_set,
                    spreads=_spreads(summaries),
                    restart_s=_median([r.restart_s for r in ok]),
                    router_wait_ms=_median([_per_request_ms(r, r.cpu.router_wait_s if r.cpu else None) for r in ok]),
                )
            )
    return out
