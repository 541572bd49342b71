"""Medians over repeated runs, one row per router, and the rotation of router order between repeats."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvgate.bench.aggregate import combine, rows
from kvgate.bench.cpu import CpuUse
from kvgate.bench.routers import RouterSpec
from kvgate.bench.engine_sets import rotated
from kvgate.bench.runner import RunOutcome
from kvgate.bench.summary import summarize

from .test_bench_report import _results
from .test_bench_summary import DELTAS, TOKENS, TRACE, WORKLOAD

BASE = summarize(WORKLOAD, TRACE, DELTAS, tokens_of=lambda r: TOKENS[r.id], block_size=4)


def test_one_summary_is_its_own_median():
    assert combine([BASE]) is BASE
    with pytest.raises(ValueError):
        combine([])


def test_figures_are_medians_and_counts_are_sums():
    runs = [
        replace(BASE, hit_rate=0.2, ttft_ms_p50=300.0, light_share=None),
        replace(BASE, hit_rate=0.5, ttft_ms_p50=100.0, light_share=0.4),
        replace(BASE, hit_rate=0.4, ttft_ms_p50=200.0, light_share=0.6, requests_failed=2),
    ]

    combined = combine(runs)

    assert combined.hit_rate == 0.4
    assert combined.ttft_ms_p50 == 200.0
    assert combined.light_share == pytest.approx(0.5)  # the run without one is left out
    assert combined.requests_sent == 3 * BASE.requests_sent
    assert combined.requests_failed == 2 * BASE.requests_failed + 2
    assert combined.service_by_user == BASE.service_by_user  # not a number: from the median-TTFT run


def test_rows_group_repeats_per_router_with_ranges_and_failures():
    results = _results()
    first = results.runs[0]
    cpu = CpuUse(wall_s=10.0, router_s=0.5, engines_s=1.0, others_share=0.5, load_average=1.0)
    again = replace(first, summary=replace(first.summary, hit_rate=0.9, ttft_ms_p50=900.0), cpu=cpu, repeat=1)
    failed = RunOutcome(router=first.router, workload=first.workload, started_at="t", error="gone", repeat=2)
    results = replace(results, runs=(*results.runs, again, failed), repeats=3)

    table = {row.router: row for row in rows(results, "skewed-users")}

    kvgate = table["kvgate:kv-aware"]
    assert kvgate.repeats_ok == 2 and kvgate.errors == ("gone",)
    assert kvgate.hit_rate_range == pytest.approx((8 / 30, 0.9))
    assert kvgate.ttft_p50_range == pytest.approx((250.0, 900.0))
    assert kvgate.router_cpu_ms == pytest.approx((10.0 + 100.0) / 2)  # 50 ms and 500 ms over 5 requests
    assert kvgate.others_cpu_share == pytest.approx((0.25 + 0.5) / 2)
    assert table["sglang:cache_aware"].repeats_ok == 1
    assert rows(results, "no-such-workload") == []


def test_each_repeat_starts_one_router_further():
    specs = [RouterSpec.parse(n) for n in ("kvgate:kv-aware", "sglang:cache_aware", "vllm-router:cache_aware")]

    assert [r.family for r in rotated(specs, 0)] == ["kvgate", "sglang", "vllm-router"]
    assert [r.family for r in rotated(specs, 1)] == ["sglang", "vllm-router", "kvgate"]
    assert rotated(specs, 3) == specs
    assert rotated([], 2) == []
