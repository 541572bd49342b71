"""`kvgate bench --quick` end to end: every router ran on every workload and every figure was produced.

A smoke test of the harness on real vLLM CPU engines, SGLang's router and
vllm-router: it checks that the figures exist and are numbers, never how fast
anything was.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kvgate.bench.routers import DEFAULT_OVERHEAD_ROUTERS, DEFAULT_ROUTERS
from kvgate.bench.workloads import DEFAULT_WORKLOADS

#: The quick run takes about five minutes here; this only stops a hung run.
TIMEOUT_S = 20 * 60

# The run is the module fixture's set-up: allow it past the suite's per-test timeout.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(TIMEOUT_S + 300)]

RUN_FIGURES = (
    "hit_rate",
    "hit_rate_bound",
    "hit_rate_vs_bound",
    "ttft_ms_p50",
    "ttft_ms_p90",
    "ttft_ms_p99",
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms_p99",
    "throughput_rps",
    "output_tokens_per_s",
    "jain_index",
)
FAIRNESS_FIGURES = ("light_share", "light_share_fair", "light_share_vtc_floor")
OVERHEAD_FIGURES = ("direct_ms_p50", "via_ms_p50", "added_ms_p50", "added_ms_p99", "max_rps")
PLOTS = ("hit_rate.png", "ttft.png", "fairness.png", "overhead.png")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_results(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("vllm", "sglang_router", "vllm_router", "matplotlib", "tqdm"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    out = tmp_path_factory.mktemp("bench") / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvgate",
            "bench",
            "--quick",
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"kvgate bench --quick exited {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    return out


def test_every_router_ran_on_every_workload_without_failures(quick_results: Path):
    results = json.loads((quick_results / "results.json").read_text())

    assert results["complete"] is True
    ran = {(run["router"], run["workload"]): run for run in results["runs"]}
    assert set(ran) == {(router, workload) for router in DEFAULT_ROUTERS for workload in DEFAULT_WORKLOADS}
    for (router, workload), run in ran.items():
        summary = run["summary"]
        assert run["error"] is None and summary is not None, (router, workload, run["error"])
        assert summary["requests_ok"] > 0 and summary["requests_failed"] == 0, (
            router,
            workload,
            summary["failure_samples"],
        )
        assert summary["engine_prefix_queries"] > 0, (router, workload)
        for name in RUN_FIGURES:
            assert _finite(summary[name]), (router, workload, name, summary[name])
        assert 0.0 <= summary["hit_rate"] <= 1.0 and 0.0 < summary["hit_rate_bound"] <= 1.0
        assert len(summary["engines"]) == 2
        assert summary["service_by_user"] and all(_finite(v) for v in summary["service_by_user"].values())
        if workload == "skewed-users":
            for name in FAIRNESS_FIGURES:
                assert _finite(summary[name]), (router, name)


def test_every_gateway_was_measured_against_the_stub(quick_results: Path):
    overhead = json.loads((quick_results / "results.json").read_text())["overhead"]

    assert overhead["failures"] == {}
    assert _finite(overhead["stub_max_rps"]) and overhead["stub_max_rps"] > 0
    gateways = {g["router"]: g for g in overhead["gateways"]}
    assert set(gateways) == set(DEFAULT_OVERHEAD_ROUTERS)
    for name, gateway in gateways.items():
        for figure in OVERHEAD_FIGURES:
            assert _finite(gateway[figure]), (name, figure)
        assert gateway["max_rps"] > 0 and gateway["curve"]


def test_table_and_plots_were_written(quick_results: Path):
    table = (quick_results / "results.md").read_text()

    for name in (*DEFAULT_ROUTERS, *DEFAULT_WORKLOADS, *DEFAULT_OVERHEAD_ROUTERS):
        assert name in table
    assert "failed:" not in table
    for plot in PLOTS:
        data = (quick_results / plot).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, plot
