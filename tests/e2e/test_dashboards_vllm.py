"""The dashboards' vLLM and connector metric names against a real vLLM CPU engine's /metrics.

One engine loads the tiered-cache connector (L2 on a real cache node, L3 in
a private Redis), serves a repeated prompt, and then must export every
``vllm:`` name the dashboards and alert rules query, plus every store-side
``kvgate_kvcache_*`` name (the connector's, re-exported through vLLM); and a
real Prometheus scraping it must answer every panel that reads engine-side
series.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.dashboards import exported_names, metric_names, shipped_queries, substitute
from tests.support.kvcache_cluster import SharedCacheCluster, complete, shared_cache_cluster, wait_for
from tests.support.prometheus import SCRAPE_INTERVAL_S, run_prometheus


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    with shared_cache_cluster(tmp_path_factory.mktemp("dashboards-e2e"), tiny_model_dir, engines=1, nodes=1) as running:
        yield running


def _names(url: str) -> set[str]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        return exported_names(response.read().decode())


def test_real_engine_exports_every_vllm_and_connector_name(cluster: SharedCacheCluster) -> None:
    url = cluster.engines[0].url
    prompt = [7 + (i % 900) for i in range(600)]
    for _ in range(2):
        complete(url, prompt, max_tokens=2)
    wait_for(lambda: "kvgate_kvcache_hits_total" in _names(url), timeout=60)
    exported = _names(url)
    wanted = set().union(*(metric_names(expr) for _, expr in shipped_queries()))
    vllm = {n for n in wanted if n.startswith("vllm:")}
    connector = {n for n in wanted if n.startswith("kvgate_kvcache_") and not n.startswith("kvgate_kvcache_node_")}
    assert vllm and not vllm - exported, sorted(vllm - exported)
    assert connector and not connector - exported, sorted(connector - exported)


def test_panels_on_engine_metrics_return_data_from_prometheus(cluster: SharedCacheCluster, tmp_path: Path) -> None:
    """Prometheus scrapes the real engine; every panel that reads only engine-side series answers."""
    url = cluster.engines[0].url
    engine_side = [
        (where, expr)
        for where, expr in shipped_queries()
        if not where.startswith("rules:")
        and all(n.startswith("vllm:") or (n.startswith("kvgate_kvcache_") and "_node_" not in n) for n in metric_names(expr))
    ]
    assert len(engine_side) >= 10
    with run_prometheus(tmp_path, {"vllm": [url.removeprefix("http://")]}, relabel_pod=["vllm"]) as prometheus:
        deadline = time.monotonic() + 12 * SCRAPE_INTERVAL_S
        i = 0
        while time.monotonic() < deadline:  # a shared prefix with new endings: hits and misses
            complete(url, [11 + (j % 800) for j in range(512)] + [900 + i % 100] * 8, max_tokens=1)
            i += 1
        time.sleep(2.5 * SCRAPE_INTERVAL_S)
        empty = [f"{where}: {expr}" for where, expr in engine_side if not prometheus.query(substitute(expr, "10s"))]
    assert not empty, "panels without data:\n" + "\n".join(empty)
