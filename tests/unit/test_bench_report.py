"""The benchmark's outputs from hand-made results: JSON without NaN, the Markdown tables, the plots."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from kvgate.bench import config
from kvgate.bench.cpu import CpuUse
from kvgate.bench.load import RequestRecord, RunTrace
from kvgate.bench.overhead import GatewayOverhead, OverheadReport, RatePoint
from kvgate.bench.report import (
    jsonable,
    markdown,
    predicted_hit_rate,
    write_json,
    write_plots,
    write_records,
)
from kvgate.bench.runner import BenchResults, RunOutcome, WorkloadInfo
from kvgate.bench.summary import summarize
from kvgate.bench.workloads import BenchRequest, Session, Workload

from .test_bench_summary import DELTAS, TOKENS, TRACE, WORKLOAD

META = {"command": "kvgate bench --quick", "machine": "2 CPUs", "vllm": "0.32.0"}


def _results(*, failed_run: bool = False) -> BenchResults:
    summary = summarize(
        WORKLOAD,
        TRACE,
        DELTAS,
        tokens_of=lambda r: TOKENS[r.id],
        block_size=4,
        router_metrics={
            'kvgate_predicted_prefix_hit_tokens_total{pod="a"}': 30.0,
            'kvgate_predicted_prefix_hit_tokens_total{pod="b"}': 10.0,
            'kvgate_prompt_tokens_total{pod="a"}': 100.0,
            'kvgate_prompt_tokens_total{pod="b"}': 60.0,
            'kvgate_time_to_first_byte_seconds_sum{policy="kv-aware"}': 1.0,
            'kvgate_time_to_first_byte_seconds_count{policy="kv-aware"}': 4.0,
            "kvgate_admission_wait_seconds_sum": 0.05,
        },
    )
    runs = [
        RunOutcome(
            router="kvgate:kv-aware",
            workload="skewed-users",
            started_at="t",
            summary=summary,
            records=TRACE.records,
            cpu=CpuUse(
                wall_s=10.0, router_s=0.05, engines_s=12.0, others_share=0.25, load_average=3.0, router_wait_s=0.1
            ),
        ),
        RunOutcome(router="sglang:cache_aware", workload="skewed-users", started_at="t", summary=summary),
    ]
    if failed_run:
        runs.append(
            RunOutcome(router="vllm-router:kv_aware", workload="skewed-users", started_at="t", error="boom\nmore")
        )
    gateway = GatewayOverhead(
        router="kvgate:kv-aware", direct_ms_p50=0.3, direct_ms_p99=0.5, via_ms_p50=1.0, via_ms_p99=1.4,
        added_ms_p50=0.7, added_ms_p99=0.9, max_rps=2500.0, max_rps_concurrency=64,
        curve=(RatePoint(1, 900.0, 0), RatePoint(64, 2500.0, 0)), client_bound=False, errors=0, router_metrics={},
    )  # fmt: skip
    sglang = replace(gateway, router="sglang:cache_aware", max_rps=5000.0, client_bound=True)
    return BenchResults(
        config=config.quick(),
        repeats=1,
        routers=tuple(dict.fromkeys(r.router for r in runs)),
        workloads=(
            WorkloadInfo(
                name="skewed-users",
                description="d",
                params={},
                sessions=2,
                requests=5,
                duration_s=10.0,
                bound_nominal=None,
            ),
        ),
        runs=tuple(runs),
        overhead=OverheadReport(
            stub_max_rps=5100.0,
            stub_curve=(RatePoint(1, 3000.0, 0),),
            pinned=True,
            gateways=(gateway, sglang),
            failures={},
        ),
        overhead_error=None,
        engine_ready_s=(30.0, 31.0),
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:10:00+00:00",
    )


def test_json_has_no_nan_and_no_records(tmp_path):
    results = _results()

    path = write_json(results, META, tmp_path)

    data = json.loads(path.read_text())  # strict: NaN would not parse back as a number
    assert data["complete"] is True
    assert data["meta"]["command"] == "kvgate bench --quick"
    run = data["runs"][0]
    assert "records" not in run
    assert run["summary"]["hit_rate"] == pytest.approx(8 / 30)
    assert data["overhead"]["gateways"][1]["client_bound"] is True
    assert jsonable({"x": math.nan, "y": (1.0, math.inf)}) == {"x": None, "y": [1.0, None]}


def test_records_are_written_one_line_each(tmp_path):
    (first, second) = write_records(_results(), tmp_path)

    lines = first.read_text().splitlines()
    assert first.name == "skewed-users--kvgate-kv-aware.jsonl"
    assert [json.loads(line)["request_id"] for line in lines] == [r.request_id for r in TRACE.records]
    assert second.read_text() == ""


def test_markdown_has_a_row_per_run_and_the_overhead_ratio():
    text = markdown(_results(failed_run=True), META)

    assert "## skewed-users" in text
    assert "| kvgate:kv-aware | 0.267 |" in text
    assert "| vllm-router:kv_aware | failed: boom |" in text
    assert "light share (fair / VTC floor)" in text
    assert "| 0.280 (0.500 / 0.140) |" in text
    assert "| 5000 (client-bound) | 64 | 1.00 |" in text
    assert "| 2500 | 64 | 0.50 |" in text
    assert "| 0.250 |" in text  # kvgate's predicted hit rate, 40 / 160
    # 50 ms of router CPU and 100 ms waiting for a core over 5 requests, others took 25%; the gateway's
    # own TTFT 1 s over 4 first bytes, of which 50 ms queued over 5 requests
    assert "| 10.0 | 20.0 | 25 | 250.0 (10.0) | n/a | 0.250 |" in text


def test_incomplete_results_say_so():
    assert _results(failed_run=True).complete is False
    assert predicted_hit_rate({}) is None


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")

    written = write_plots(_results(), tmp_path)

    assert sorted(p.name for p in written) == ["fairness.png", "hit_rate.png", "overhead.png", "ttft.png"]
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG")


def test_an_untimed_workload_gets_no_fairness_plot(tmp_path):
    pytest.importorskip("matplotlib")
    request = BenchRequest(id="r", user="u", messages=(("user", "hi"),), max_tokens=1)
    workload = Workload(name="w", description="", seed=0, sessions=(Session("s", "u", (request,)),), clients=1)
    record = RequestRecord("r", "s", "u", 0.0, 0.1, 0.2, 200, None, 8, 1)
    summary = summarize(workload, RunTrace((record,), 0.2), DELTAS, tokens_of=lambda r: [1] * 8, block_size=4)
    results = replace(
        _results(),
        routers=("kvgate:kv-aware",),
        workloads=(WorkloadInfo("w", "", {}, 1, 1, None, 0.0),),
        runs=(RunOutcome(router="kvgate:kv-aware", workload="w", started_at="t", summary=summary),),
        overhead=None,
    )

    written = write_plots(results, tmp_path)

    assert sorted(p.name for p in written) == ["hit_rate.png", "ttft.png"]
