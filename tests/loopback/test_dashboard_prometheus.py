"""Every dashboard panel returns data from a real Prometheus scraping real kvgate processes under traffic.

Prometheus (Debian's package, scraping every second) scrapes a gateway over
two stub engines, two ``kvgate cache-node`` processes, and a tiered store
(L1, L2 on those nodes, L3 on disk) like the one the connector runs inside
vLLM, whose metrics are served as the connector's would be. Traffic covers
cache hits, queueing, errors, retries, broken streams, two users and block
reads and writes through every tier; then each panel's query must return at
least one series through the HTTP API, and the alert rules load and evaluate
without error. Prometheus's own config and rules pass ``promtool``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvcache.metrics import StoreMetrics
from kvcache.settings import CacheSettings, L1Settings, L2Settings, L3Settings
from kvcache.wiring import build_store
from kvgate.engines import free_ports
from kvgate.stub_engine import StubBehaviour, run_app
from tests.loopback.conftest import Cluster, fast_settings, start_cluster
from tests.support import kvcache_blocks as blocks
from tests.support.dashboards import shipped_queries, substitute
from tests.support.kvcache_cluster import CacheNodeProcess
from tests.support.prometheus import SCRAPE_INTERVAL_S, promtool, run_prometheus

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "rules.yml"
#: Stands in for Grafana's $__rate_interval: four scrape intervals and then some.
RATE_WINDOW = f"{10 * SCRAPE_INTERVAL_S}s"


def test_shipped_config_and_rules_pass_promtool():
    config = promtool("check", "config", str(ROOT / "config" / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def _host(url: str) -> str:
    return url.removeprefix("http://")


async def _serving_traffic(cluster: Cluster, seconds: float) -> None:
    """Requests for `seconds`: repeated prefixes, two users, bursts that queue, errors, retries, broken streams."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    system = "You are a careful assistant who answers briefly. " * 12

    async def one(user: str, i: int, stream: bool = False) -> int:
        body = {"model": "tiny-llama", "prompt": f"{system} question {i % 4}", "max_tokens": 3, "stream": stream}
        async with await cluster.post("/v1/completions", body, headers={"x-user-id": user}) as response:
            await response.read()
            return response.status

    i = 0
    flaky, other = cluster.engines
    while loop.time() < deadline:
        statuses = await asyncio.gather(*(one(("alice", "bob")[j % 2], i + j) for j in range(6)))
        assert 200 in statuses
        if i % 24 == 6:  # a pod that answers 503: the gateway retries elsewhere
            flaky.behaviour.fail_status = 503
            await one("bob", i)
            flaky.behaviour.fail_status = 500  # a plain error, counted by status
            await asyncio.gather(*(one("bob", i + j) for j in range(4)))
            flaky.behaviour.fail_status = None
        if i % 24 == 12:  # streams cut off mid-answer
            for engine in cluster.engines:
                engine.behaviour.die_after_chunks = 1
            await asyncio.gather(*(one("alice", i + j, stream=True) for j in range(2)))
            for engine in cluster.engines:
                engine.behaviour.die_after_chunks = None
        i += 6


async def _cache_traffic(store, seconds: float) -> None:
    """Writes and reads through L1 (small: it evicts), L2 and L3; some keys are never written (misses)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    n = 0
    while loop.time() < deadline:
        items = [(blocks.key(n + j), blocks.frame(n + j, 16 << 10)) for j in range(8)]
        await store.put(items)
        await store.flush()
        await store.get([blocks.key(k) for k in range(max(0, n - 16), n + 8)] + [blocks.key(10**6 + n)])
        n += 8
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _connector_metrics(registry: CollectorRegistry):
    """Serve `registry` on /metrics, as vLLM's API server serves the connector's figures."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"content-type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with run_app(app) as url:
        yield url


async def test_every_panel_returns_data_from_prometheus(tmp_path: Path):
    ports = free_ports(2)
    nodes = [CacheNodeProcess(tmp_path, f"node-{i}", "--metrics-port", str(port)) for i, port in enumerate(ports)]
    settings = fast_settings(max_inflight_per_pod=2)
    registry = CollectorRegistry()
    cache = CacheSettings(
        l1=L1Settings(capacity_bytes=64 << 10),
        l2=L2Settings(peers=tuple(node.spec for node in nodes)),
        l3=L3Settings(kind="disk", path=str(tmp_path / "l3")),
    )
    store = build_store(cache, metrics=StoreMetrics(registry))
    prometheus = contextlib.ExitStack()
    try:
        await store.start()
        async with start_cluster(2, settings, behaviour=StubBehaviour(delay_s=0.02)) as cluster, _connector_metrics(registry) as connector:
            # Stub engines share one StubBehaviour above; give each its own so one can fail alone.
            for engine in cluster.engines:
                engine.behaviour = StubBehaviour(delay_s=0.02)
            jobs = {
                "kvgate-gateway": [_host(cluster.url)],
                "vllm": [_host(e.url) for e in cluster.engines],
                "kvgate-cache-node": [f"127.0.0.1:{port}" for port in ports],
                "kvgate-connector": [_host(connector)],
            }
            server = await asyncio.to_thread(
                prometheus.enter_context, run_prometheus(tmp_path, jobs, [RULES], relabel_pod=["vllm"])
            )
            await asyncio.gather(_serving_traffic(cluster, 14.0), _cache_traffic(store, 14.0))
            # Let Prometheus scrape the final state twice more before asking.
            await asyncio.sleep(2.5 * SCRAPE_INTERVAL_S)
            empty = []
            results: dict[str, list] = {}
            for where, expr in shipped_queries():
                if where.startswith("rules:"):
                    continue
                result = await asyncio.to_thread(server.query, substitute(expr, RATE_WINDOW))
                results.setdefault(where, []).extend(result)
                if not result:
                    empty.append(f"{where}: {expr}")
            groups = (await asyncio.to_thread(server.api, "/api/v1/rules"))["groups"]
            up = await asyncio.to_thread(server.query, "up")
    finally:
        await asyncio.to_thread(prometheus.close)
        await store.aclose()
        for node in nodes:
            node.stop()
    assert {r["metric"]["job"] for r in up} == set(jobs)
    # Some figures must show what the traffic did, not only exist.
    hit_rates = [float(r["value"][1]) for r in results["fleet.json: Engine-confirmed prefix hit rate"]]
    assert max(hit_rates) > 0, hit_rates
    tiers = {r["metric"].get("tier") for r in results["kvcache.json: Hits per tier and misses"] if float(r["value"][1]) > 0}
    assert {"l1", "l2"} <= tiers, tiers
    statuses = {r["metric"]["status"] for r in results["fleet.json: Errors by pod and status"]}
    # Each failed attempt is counted before the retry elsewhere: 502 for the pod's 500
    # (broken), 503 for the pod's 503 (overloaded).
    assert {"502", "503"} <= statuses, statuses
    assert not empty, "panels without data:\n" + "\n".join(empty)
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == sum(1 for where, _ in shipped_queries() if where.startswith("rules:"))
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
