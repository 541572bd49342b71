"""Cache nodes find each other on Kubernetes, and a block's replicas land on different nodes and zones.

kmock's API emulator holds the Pod and Node objects; the cache nodes are real
gRPC servers on 127.0.0.1 (in-process, and one `kvgate cache-node` process for
the command line). A pod joins the ring when Ready and leaves it the moment it
is marked for deletion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.errors import ConfigError, TierUnavailable
from kvcache.membership import make_membership
from kvcache.membership.kubernetes import KubernetesMembership, api_client, parse_selector
from kvcache.metrics import NodeMetrics, StoreMetrics
from kvcache.ring import NodeInfo
from kvcache.server import CacheNode, NodeSettings
from kvcache.tiers import PeerTier
from tests.support.kube import NAMESPACE, KubeAPI, kube_api, node, pod, ready_condition
from tests.support.kvcache_blocks import frame, key
from tests.support.kvcache_servers import free_port, leftover_tasks

BLOCKS = 200
SELECTOR = {"app": "cache"}


def membership(api: KubeAPI) -> KubernetesMembership:
    return KubernetesMembership(api_client(api.url), namespace=NAMESPACE, selector=SELECTOR, cache_s=0.0)


@contextlib.asynccontextmanager
async def cache_fleet(api: KubeAPI, placement: Sequence[tuple[str, str | None]], replicas: int) -> AsyncIterator[list[CacheNode]]:
    """One cache node per `(kubernetes node, zone)`, each a pod `cache-i` that turns Ready once serving."""
    for name, zone in {p for p in placement}:
        await api.create_node(node(name, zone))
    nodes: list[CacheNode] = []
    views: list[KubernetesMembership] = []
    try:
        for index, (host, _) in enumerate(placement):
            name = f"cache-{index}"
            await api.create_pod(pod(name, f"uid-{name}", port=0, ready=False, labels=SELECTOR, node=host))
            own = membership(api)
            views.append(own)
            cache = CacheNode(
                NodeSettings(node_id=name, labels=await own.labels_of(name), replicas=replicas, capacity_bytes=64 << 20),
                membership=own,
                metrics=NodeMetrics(CollectorRegistry()),
            )
            info = await cache.start()
            nodes.append(cache)
            port = info.address.rsplit(":", 1)[1]
            await api.patch_pod(
                name, {"metadata": {"annotations": {"kvgate.io/port": port}}, "status": {"conditions": [ready_condition(True)]}}
            )
        yield nodes
    finally:
        for cache in nodes:
            await cache.stop(0)
        for view in views:
            await view.aclose()


async def holders(nodes: list[CacheNode], index: int) -> list[NodeInfo]:
    return [n.info for n in nodes if key(index) in n.store]


@pytest.mark.parametrize(
    ("placement", "replicas", "domain"),
    [
        pytest.param([("n1", None), ("n1", None), ("n2", None)], 2, "host", id="hosts"),
        pytest.param([("n1", "zone-a"), ("n2", "zone-a"), ("n3", "zone-b"), ("n4", "zone-b")], 2, "zone", id="zones"),
    ],
)
async def test_replicas_land_on_different_kubernetes_nodes_and_zones(placement, replicas: int, domain: str) -> None:
    async with kube_api() as api, cache_fleet(api, placement, replicas) as nodes:
        members = await membership(api).members()
        assert {m.node_id for m in members} == {f"cache-{i}" for i in range(len(placement))}
        assert {m.node_id: m.label("host") for m in members} == {f"cache-{i}": h for i, (h, _) in enumerate(placement)}
        client = PeerTier(membership(api), replicas=replicas, read_fallback=0, metrics=StoreMetrics(CollectorRegistry()))
        await client.start()
        try:
            await client.put([(key(i), frame(i, 1024)) for i in range(BLOCKS)])
            for i in range(BLOCKS):
                copies = await holders(nodes, i)
                assert len(copies) == replicas
                assert len({c.label(domain) for c in copies}) == replicas, f"block {i}: {copies}"
        finally:
            await client.aclose()
    assert await leftover_tasks() == []


async def test_a_pod_leaves_the_ring_when_marked_for_deletion_or_not_ready() -> None:
    async with kube_api() as api, cache_fleet(api, [("n1", None), ("n2", None), ("n3", None)], 1):
        view = membership(api)
        try:
            assert len(await view.members()) == 3
            await api.patch_pod("cache-0", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["hold"]}})
            await api.patch_pod("cache-1", {"status": {"conditions": [ready_condition(False)]}})
            assert [m.node_id for m in await view.members()] == ["cache-2"]
            await view.deregister("cache-2")  # a leaving node drops itself from its own view at once
            assert await view.members() == []
        finally:
            await view.aclose()


async def test_cache_node_command_joins_through_kubernetes(tmp_path: Path) -> None:
    async with kube_api() as api:
        await api.create_node(node("n7", "zone-q"))
        port = free_port()
        await api.create_pod(pod("cache-0", "uid-0", port=port, labels=SELECTOR, node="n7"))
        ready = tmp_path / "ready.json"
        argv = [
            sys.executable, "-m", "kvgate", "cache-node", "--port", str(port), "--node-id", "cache-0",
            "--membership", "kubernetes", "--selector", "app=cache", "--namespace", NAMESPACE,
            "--kubernetes-api-url", api.url, "--ready-file", str(ready), "--log-level", "WARNING",
        ]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
                assert time.monotonic() < deadline, "the cache node did not start"
                await asyncio.sleep(0.05)
            spec = NodeInfo.parse(json.loads(ready.read_text())["spec"])
            assert spec.node_id == "cache-0"
            assert dict(spec.labels) == {"host": "n7", "zone": "zone-q"}
            assert [m.spec() for m in await membership(api).members()] == [spec.spec()]
        finally:
            process.terminate()
            process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()


@pytest.mark.parametrize("text", ["", "app", "=x"])
def test_a_bad_selector_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_selector(text)


async def test_make_membership_picks_kubernetes_by_selector() -> None:
    chosen = make_membership(kubernetes_selector="app=cache", kubernetes_api_url="http://127.0.0.1:1", redis_url="redis://x")
    try:
        assert isinstance(chosen, KubernetesMembership)
        assert chosen.selector == SELECTOR
    finally:
        await chosen.aclose()


async def test_an_unreachable_api_server_is_a_tier_unavailable() -> None:
    view = KubernetesMembership(api_client(f"http://127.0.0.1:{free_port()}"), namespace=NAMESPACE, selector=SELECTOR)
    try:
        with pytest.raises(TierUnavailable, match="kubernetes"):
            await view.members()
    finally:
        await view.aclose()
