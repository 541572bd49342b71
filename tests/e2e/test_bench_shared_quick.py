"""`kvgate bench --quick` on the shared-cache workload, plain and shared-cache engines, two repeats.

A smoke test of the harness on real vLLM CPU engines, the tiered KV cache
and SGLang's router: every router ran on both engine sets twice, the
engine restarted mid-run came back, prefill and shared-cache figures exist,
and the shared-cache engines really loaded blocks. It checks that the
figures exist, never how fast anything was.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

#: Two routers x two engine sets x two repeats of the quick shared-cache workload.
TIMEOUT_S = 25 * 60
ROUTERS = ("kvgate:kv-aware", "sglang:cache_aware")
SETS = ("plain", "shared")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(TIMEOUT_S + 300)]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def results(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("vllm", "sglang_router", "matplotlib", "tqdm"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    out = tmp_path_factory.mktemp("bench-shared") / "results"
    done = subprocess.run(
        [
            sys.executable, "-m", "kvgate", "bench", "--quick",
            "--workloads", "shared-cache",
            "--routers", ",".join(ROUTERS),
            "--engine-sets", ",".join(SETS),
            "--repeat", "2",
            "--overhead-routers", "none",
            "--out", str(out), "--model", str(tiny_model_dir), "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"kvgate bench exited {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    return out


def test_every_router_ran_twice_on_each_engine_set_through_a_restart(results: Path):
    body = json.loads((results / "results.json").read_text())

    assert body["complete"] is True and body["repeats"] == 2 and body["engine_sets"] == list(SETS)
    ran = [(run["router"], run["engine_set"], run["repeat"]) for run in body["runs"]]
    assert sorted(ran) == sorted((r, s, k) for r in ROUTERS for s in SETS for k in range(2))
    firsts = {body["runs"][0]["router"], body["runs"][len(body["runs"]) // 2]["router"]}
    assert firsts == set(ROUTERS)  # the second repeat started with the other router
    for run in body["runs"]:
        summary = run["summary"]
        where = (run["router"], run["engine_set"], run["repeat"])
        assert run["error"] is None and summary is not None, where
        assert _finite(run["restart_s"]) and run["restart_s"] > 0, where  # the engine came back
        assert summary["requests_ok"] > summary["requests_sent"] // 2, (where, summary["failure_samples"])
        for name in ("ttft_ms_p50", "ttft_ms_p90", "prefill_tokens_computed", "external_hit_tokens"):
            assert _finite(summary[name]), (where, name)
        assert 0 < summary["min_prefill_tokens"] <= summary["bound_prompt_tokens"]
        assert summary["prefill_tokens_computed"] > 0, where
        if run["engine_set"] == "plain":
            assert summary["external_hit_tokens"] == 0, where


def test_shared_cache_engines_loaded_blocks_they_did_not_compute(results: Path):
    body = json.loads((results / "results.json").read_text())

    loaded = [run["summary"]["external_hit_tokens"] for run in body["runs"] if run["engine_set"] == "shared"]
    assert loaded and all(tokens > 0 for tokens in loaded), loaded


def test_table_shows_both_sets_with_ranges_and_ratios(results: Path):
    table = (results / "results.md").read_text()

    for router in ROUTERS:
        assert f"| {router} |" in table and f"| {router}@shared |" in table
    assert "prefill computed (least)" in table and "## kvgate against sglang:cache_aware" in table
    assert "failed:" not in table
    records = sorted(p.name for p in (results / "records").iterdir())
    assert len(records) == len(ROUTERS) * len(SETS) * 2
