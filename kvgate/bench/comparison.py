"""kvgate's rows as ratios of SGLang's router on each engine set: what the targets are stated in.

When a benchmark ran on more than one engine set (plain engines and engines
wired to kvgate's shared KV cache), the question is how kvgate's routers
compare with SGLang's `cache_aware` on the engines users run today (plain)
and on the very same engines (shared). This module sets every kvgate row of
a workload against every `sglang:cache_aware` row of it: TTFT p50 and p90
(medians over repeats) and prefill tokens computed, each as kvgate / SGLang
(below 1: kvgate is faster or computes less). Ratios are taken within one
benchmark run, whose rows ran interleaved on the same machine.

Called by `kvgate.bench.report`; pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvgate.bench.aggregate import rows
from kvgate.bench.runner import BenchResults

#: The router the ratios are taken against.
REFERENCE = "sglang:cache_aware"


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
    """

    workload: str
    row: str
    reference: str
    ttft_p50: float | None
    ttft_p90: float | None
    prefill: float | None


def _ratio(ours: float, theirs: float) -> float | None:
    if not (math.isfinite(ours) and math.isfinite(theirs)) or theirs <= 0:
        return None
    return ours / theirs


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
            out.append(
                Ratio(
                    workload=workload,
                    row=row.label,
                    reference=ref.label,
                    ttft_p50=_ratio(mine.ttft_ms_p50, theirs.ttft_ms_p50),
                    ttft_p90=_ratio(mine.ttft_ms_p90, theirs.ttft_ms_p90),
                    prefill=_ratio(mine.prefill_tokens_computed, theirs.prefill_tokens_computed),
                )
            )
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown_lines(results: BenchResults) -> list[str]:
    """The ratio tables, one block for all workloads; empty unless several engine sets ran."""
    if len(results.engine_sets) < 2:
        return []
    found: Sequence[Ratio] = [r for info in results.workloads for r in ratios(results, info.name)]
    if not found:
        return []
    lines = [
        "",
        f"## kvgate against {REFERENCE}",
        "",
        (
            "Each kvgate row as a ratio of SGLang's router on each engine set (medians over repeats; below 1 "
            "is better for kvgate)."
        ),
        "",
        "| workload | row | against | TTFT p50 | TTFT p90 | prefill computed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in found:
        lines.append(
            f"| {r.workload} | {r.row} | {r.reference} | {_fmt(r.ttft_p50)} | {_fmt(r.ttft_p90)} | {_fmt(r.prefill)} |"
        )
    return lines


__all__ = ["REFERENCE", "Ratio", "markdown_lines", "ratios"]
