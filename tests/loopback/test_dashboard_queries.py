"""Every query kvgate ships parses as PromQL and names only metrics that running processes export.

The names are read from the ``/metrics`` of real processes: a gateway over
stub engines (the stub mirrors vLLM's cache series; a real vLLM engine checks
the same names in tests/e2e/test_dashboards_vllm.py) and a real
``kvgate cache-node``, whose store metrics are the same families the
connector re-exports through vLLM.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from kvgate.dashboards import BOARDS
from kvgate.engines import free_ports
from tests.loopback.conftest import start_cluster
from tests.support.dashboards import PROMETHEUS_BUILTINS, exported_names, metric_names, shipped_queries
from tests.support.kvcache_cluster import CacheNodeProcess

ROOT = Path(__file__).resolve().parents[2]
_LABEL_VALUES = re.compile(r"label_values\(([^,)]+)")


def variable_metrics() -> set[str]:
    """Metric names the dashboards' template variables read."""
    names = set()
    for build in BOARDS.values():
        for variable in build()["templating"]["list"]:
            names.update(m.strip() for m in _LABEL_VALUES.findall(str(variable.get("query", ""))))
    return names


def test_generated_files_are_committed_and_current():
    result = subprocess.run(
        [sys.executable, "-m", "kvgate.dashboards", "--check", "--out", str(ROOT / "config")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where, expr", shipped_queries(), ids=[w for w, _ in shipped_queries()])
def test_query_parses(where: str, expr: str):
    assert metric_names(expr), f"{where}: selects no metric"


def test_every_dashboard_uses_the_datasource_variable():
    for name, build in BOARDS.items():
        board = build()
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert {"model", "pod", "cache_node"} <= set(variables), name
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (name, panel["title"])
        json.dumps(board)


@pytest.fixture
def cache_node(tmp_path):
    port = free_ports(1)[0]
    node = CacheNodeProcess(tmp_path, "node-a", "--metrics-port", str(port))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        node.stop()


async def test_every_named_metric_is_exported_by_a_running_process(cache_node: str):
    async with start_cluster(2) as cluster, aiohttp.ClientSession() as http:
        response = await cluster.post("/v1/completions", {"model": "tiny-llama", "prompt": "hello " * 200, "max_tokens": 2})
        assert response.status == 200
        await response.read()
        gateway = exported_names(await (await http.get(cluster.url + "/metrics")).text())
        engine = exported_names(await (await http.get(cluster.engines[0].url + "/metrics")).text())
        node = exported_names(await (await http.get(cache_node)).text())
    wanted = set().union(*(metric_names(expr) for _, expr in shipped_queries())) | variable_metrics()
    vllm_names = {n for n in wanted if n.startswith("vllm:")}
    assert vllm_names and vllm_names <= engine, sorted(vllm_names - engine)
    kvgate_names = wanted - vllm_names - PROMETHEUS_BUILTINS
    missing = kvgate_names - gateway - node
    assert not missing, sorted(missing)
    # Each kvgate family has one home: the gateway's own, or the KV cache's.
    assert {n for n in kvgate_names if n.startswith("kvgate_kvcache_")} <= node
