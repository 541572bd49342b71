"""kvgate's rows as ratios of SGLang's router: what the targets are stated in.

The question is how kvgate's routers compare with SGLang's `cache_aware` on
the same engines, and, when a benchmark ran on more than one engine set
(plain engines and engines wired to kvgate's shared KV cache), on the
engines users run today (plain) against kvgate on shared ones. This module
sets every kvgate row of a workload against every `sglang:cache_aware` row
of it: hit rate, TTFT p50 and p90 (medians over repeats) and prefill tokens
computed, each as kvgate / SGLang. Ratios are taken within one benchmark
run, whose rows ran interleaved on the same machine.

On a small shared machine one router's TTFT p50 can move by half between
repeats, so a ratio of medians can hide whether kvgate was ahead every time
or once by much. With `--repeat` the runs of one repeat ran minutes apart,
so each ratio is also taken repeat by repeat (`Paired`): its median, range,
and in how many repeats kvgate was better.

Called by `kvgate.bench.report`; pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvgate.bench.aggregate import RouterRow, rows, runs_of
from kvgate.bench.runner import BenchResults, RunOutcome
from kvgate.bench.stats import spread

#: The router the ratios are taken against.
REFERENCE = "sglang:cache_aware"

#: Figures compared repeat by repeat, with whether a higher value is better for kvgate.
PAIRED_FIGURES: dict[str, bool] = {"hit_rate": True, "ttft_ms_p50": False, "ttft_ms_p90": False}


@dataclass(frozen=True, slots=True)
class Paired:
    """kvgate's figure over the reference's, taken within each repeat that both completed.

    Attributes:
        median: median of the per-repeat ratios.
        low: the smallest of them.
        high: the largest.
        better: repeats in which kvgate was better (lower TTFT, higher hit rate).
        pairs: repeats compared.
    """

    median: float
    low: float
    high: float
    better: int
    pairs: int


@dataclass(frozen=True, slots=True)
class Ratio:
    """One kvgate row against one reference row, on one workload.

    Attributes:
        workload: the workload.
        row: the kvgate row's label (`kvgate:kv-aware@shared`).
        reference: the reference row's label.
        ttft_p50: kvgate's TTFT p50 / the reference's; None when either is missing.
        ttft_p90: the same for TTFT p90.
        prefill: prefill tokens computed, kvgate's / the reference's.
        hit_rate: the engines' hit rate, kvgate's / the reference's.
        per_repeat: `Paired` ratios by figure name (`PAIRED_FIGURES`), for
            the figures both rows have in at least one common repeat.
    """

    workload: str
    row: str
    reference: str
    ttft_p50: float | None
    ttft_p90: float | None
    prefill: float | None
    hit_rate: float | None = None
    per_repeat: dict[str, Paired] = field(default_factory=dict)


def _ratio(ours: float, theirs: float) -> float | None:
    if not (math.isfinite(ours) and math.isfinite(theirs)) or theirs <= 0:
        return None
    return ours / theirs


def _by_repeat(results: BenchResults, workload: str, row: RouterRow) -> dict[int, RunOutcome]:
    return {run.repeat: run for run in runs_of(results, workload, row.router, row.engine_set) if run.summary is not None}


def paired(ours: dict[int, RunOutcome], theirs: dict[int, RunOutcome], figure: str) -> Paired | None:
    """`figure`'s ratio in each repeat both rows completed (`PAIRED_FIGURES` says which way is better).

    Returns:
        The per-repeat ratios' median, range and wins; None when no repeat has both figures.
    """
    higher_is_better = PAIRED_FIGURES[figure]
    found = []
    for repeat in sorted(ours.keys() & theirs.keys()):
        mine, other = ours[repeat].summary, theirs[repeat].summary
        assert mine is not None and other is not None
        ratio = _ratio(getattr(mine, figure), getattr(other, figure))
        if ratio is not None:
            found.append(ratio)
    summary = spread(found)
    if summary is None:
        return None
    better = sum(1 for r in found if (r > 1 if higher_is_better else r < 1))
    return Paired(summary.median, summary.low, summary.high, better, summary.count)


def ratios(results: BenchResults, workload: str) -> list[Ratio]:
    """Every kvgate row of `workload` against every reference row that has figures."""
    table = [row for row in rows(results, workload) if row.summary is not None]
    references = [row for row in table if row.router == REFERENCE]
    ours = [row for row in table if row.router.startswith("kvgate:")]
    out = []
    for row in ours:
        for ref in references:
            mine, theirs = row.summary, ref.summary
            assert mine is not None and theirs is not None
            my_runs, their_runs = _by_repeat(results, workload, row), _by_repeat(results, workload, ref)
            per_repeat = {}
            for figure in PAIRED_FIGURES:
                found = paired(my_runs, their_runs, figure)
                if found is not None:
                    per_repeat[figure] = found
            out.append(
                Ratio(
                    workload=workload,
                    row=row.label,
                    reference=ref.label,
                    ttft_p50=_ratio(mine.ttft_ms_p50, theirs.ttft_ms_p50),
                    ttft_p90=_ratio(mine.ttft_ms_p90, theirs.ttft_ms_p90),
                    prefill=_ratio(mine.prefill_tokens_computed, theirs.prefill_tokens_computed),
                    hit_rate=_ratio(mine.hit_rate, theirs.hit_rate),
                    per_repeat=per_repeat,
                )
            )
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fmt_paired(value: Paired | None) -> str:
    if value is None:
        return "n/a"
    if value.pairs == 1:
        return f"{value.median:.2f}, 1 repeat"
    return f"{value.median:.2f} ({value.low:.2f}-{value.high:.2f}), {value.better} of {value.pairs}"


def markdown_lines(results: BenchResults) -> list[str]:
    """The ratio table, one block for all workloads; empty without a kvgate row and a reference row."""
    found: Sequence[Ratio] = [r for info in results.workloads for r in ratios(results, info.name)]
    if not found:
        return []
    lines = [
        "",
        f"## kvgate against {REFERENCE}",
        "",
        (
            "Each kvgate row as a ratio of SGLang's router (medians over repeats; below 1 is better for kvgate, "
            "except hit rate). Per repeat: the ratio within each repeat (the runs of one repeat ran minutes "
            "apart), its median and range, and in how many repeats kvgate was better."
        ),
        "",
        (
            "| workload | row | against | TTFT p50 | TTFT p90 | prefill computed | hit rate "
            "| TTFT p50 per repeat | TTFT p90 per repeat | hit rate per repeat |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in found:
        lines.append(
            f"| {r.workload} | {r.row} | {r.reference} | {_fmt(r.ttft_p50)} | {_fmt(r.ttft_p90)} "
            f"| {_fmt(r.prefill)} | {_fmt(r.hit_rate)} | {_fmt_paired(r.per_repeat.get('ttft_ms_p50'))} "
            f"| {_fmt_paired(r.per_repeat.get('ttft_ms_p90'))} | {_fmt_paired(r.per_repeat.get('hit_rate'))} |"
        )
    return lines


__all__ = ["PAIRED_FIGURES", "REFERENCE", "Paired", "Ratio", "markdown_lines", "paired", "ratios"]
