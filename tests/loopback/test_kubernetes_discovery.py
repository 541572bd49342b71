"""The gateway finds its pods on Kubernetes: a pod watch against kmock's API emulator.

Pod objects point at stub engines on 127.0.0.1 (annotation `kvgate.io/port`).
The gateway must route to Ready pods only, stop sending to a pod the moment it
is marked for deletion, turns not-Ready or is deleted, treat a new UID at an
old address as a new pod, resume a dropped watch from its resourceVersion,
list again on 410 Gone, and answer /ready 503 until the first list.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import kmock
import msgpack
import pytest
from prometheus_client import generate_latest
import zmq
import zmq.asyncio

from kvcache.keys import ROOT_HASH, hash_block
from kvgate.stub_engine import StubBehaviour, StubEngine, run_app, run_stub
from router.app import GATEWAY, RUNNER_OPTIONS, create_app
from router.discovery import make_discovery
from router.discovery.kubernetes import KubernetesDiscovery
from router.gateway import Gateway
from router.pods import PodEndpoint, PodId
from tests.loopback.conftest import fast_settings, wait_until
from tests.support.kube import NAMESPACE, PODS, KubeAPI, kube_api, pod, ready_condition

#: The issue's bound: a pod stops receiving new requests within a second of the change.
DROP_WITHIN_S = 1.0


@dataclass
class Fleet:
    api: KubeAPI
    url: str
    gateway: Gateway
    http: aiohttp.ClientSession

    @property
    def discovery(self) -> KubernetesDiscovery:
        assert isinstance(self.gateway.discovery, KubernetesDiscovery)
        return self.gateway.discovery

    def routable(self) -> set[PodId]:
        return {p.id for p in self.gateway.pods.healthy() if p.models}

    async def ask(self) -> tuple[int, str]:
        payload = {"model": "tiny-llama", "prompt": "a prompt of a few blocks " * 8, "max_tokens": 2}
        async with self.http.post(self.url + "/v1/completions", json=payload) as response:
            await response.read()
            return response.status, response.headers.get("x-kvgate-pod", "")

    async def ready_status(self) -> int:
        async with self.http.get(self.url + "/ready") as response:
            return response.status


def pod_id(engine: StubEngine, uid: str) -> PodId:
    return PodEndpoint(engine.url, uid=uid).id


def engine_pod(name: str, engine: StubEngine, uid: str, **kwargs) -> dict:
    return pod(name, uid, port=int(engine.url.rsplit(":", 1)[1]), **kwargs)


@contextlib.asynccontextmanager
async def start_gateway(api: KubeAPI, **routing) -> AsyncIterator[Fleet]:
    settings = fast_settings()
    settings.discovery.kind = "kubernetes"
    settings.discovery.selector = ("app=engine",)
    settings.discovery.namespace = NAMESPACE
    settings.discovery.kubernetes_api_url = api.url
    settings.discovery.retry_backoff_s = 0.05
    for name, value in routing.items():
        setattr(settings.routing, name, value)
    app = create_app(settings, discovery=make_discovery(settings.discovery), rng=random.Random(7))
    async with run_app(app, **RUNNER_OPTIONS) as url, aiohttp.ClientSession() as http:
        yield Fleet(api, url, app[GATEWAY], http)


def uid() -> str:
    return str(uuid.uuid4())


async def test_ready_answers_503_until_the_first_list_then_routes_only_ready_pods() -> None:
    async with kube_api() as api, run_stub(StubEngine()) as a, run_stub(StubEngine()) as b, run_stub(StubEngine()) as c:
        listing = asyncio.Event()
        api.emulator[kmock.action.LIST][lambda request: not listing.is_set()] << 503
        ua, ub, uc = uid(), uid(), uid()
        await api.create_pod(engine_pod("a", a, ua))
        await api.create_pod(engine_pod("b", b, ub, ready=False))
        await api.create_pod(engine_pod("c", c, uc, labels={"app": "other"}))  # the emulator ignores labelSelector
        async with start_gateway(api) as fleet:
            await wait_until(lambda: len(api.requests(kmock.action.LIST)) >= 2)
            assert not fleet.discovery.synced.is_set()
            assert await fleet.ready_status() == 503
            listing.set()
            await wait_until(lambda: fleet.routable() == {pod_id(a, ua)})
            assert await fleet.ready_status() == 200
            assert {await fleet.ask() for _ in range(4)} == {(200, pod_id(a, ua))}

            await api.patch_pod("b", {"status": {"conditions": [ready_condition(True)]}})
            await wait_until(lambda: fleet.routable() == {pod_id(a, ua), pod_id(b, ub)})
            assert not c.calls


async def test_pods_stop_receiving_requests_on_deletion_timestamp_not_ready_and_deletion() -> None:
    slow = StubBehaviour(delay_s=0.6)
    async with (
        kube_api() as api,
        run_stub(StubEngine(behaviour=slow)) as a,
        run_stub(StubEngine()) as b,
        run_stub(StubEngine()) as c,
    ):
        ua, ub, uc = uid(), uid(), uid()
        # `a` is held by a finalizer, as the kubelet holds a terminating pod
        # for its grace period: a deletionTimestamp, yet the pod still exists.
        held = engine_pod("a", a, ua)
        held["metadata"]["finalizers"] = ["kvgate.io/test-grace-period"]
        await api.create_pod(held)
        await api.create_pod(engine_pod("b", b, ub))
        await api.create_pod(engine_pod("c", c, uc))
        async with start_gateway(api, policy="round-robin") as fleet:
            everyone = {pod_id(a, ua), pod_id(b, ub), pod_id(c, uc)}
            await wait_until(lambda: fleet.routable() == everyone)

            # A request in flight on `a` (the slow one) finishes after `a` is
            # marked for deletion; round-robin puts one of three on each pod.
            in_flight = [asyncio.create_task(fleet.ask()) for _ in range(3)]
            await wait_until(lambda: len(a.calls) == 1)
            await api.patch_pod("a", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})
            await wait_until(lambda: pod_id(a, ua) not in fleet.routable(), timeout=DROP_WITHIN_S)
            assert a.running == 1
            assert api.emulator.objects[PODS, NAMESPACE, "a"]["metadata"]["deletionTimestamp"]
            assert (200, pod_id(a, ua)) in await asyncio.gather(*in_flight)
            assert {(await fleet.ask())[1] for _ in range(6)} == {pod_id(b, ub), pod_id(c, uc)}
            assert len(a.calls) == 1

            await api.patch_pod("b", {"status": {"conditions": [ready_condition(False)]}})
            await wait_until(lambda: pod_id(b, ub) not in fleet.routable(), timeout=DROP_WITHIN_S)
            calls_b = len(b.calls)
            assert {(await fleet.ask())[1] for _ in range(3)} == {pod_id(c, uc)}
            assert len(b.calls) == calls_b

            served_c = f'pod="{pod_id(c, uc)}"'
            assert served_c in generate_latest(fleet.gateway.metrics.registry).decode()
            await api.delete_pod("c")
            await wait_until(lambda: not fleet.routable(), timeout=DROP_WITHIN_S)
            assert (await fleet.ask())[0] == 503
            assert await fleet.ready_status() == 503
            # Gone from the table, gone from /metrics: pods come and go under new names.
            await wait_until(lambda: fleet.gateway.pods.get(pod_id(c, uc)) is None, timeout=DROP_WITHIN_S)
            assert served_c not in generate_latest(fleet.gateway.metrics.registry).decode()


async def test_a_new_pod_at_an_old_address_starts_with_an_empty_prefix_index_entry() -> None:
    async with kube_api() as api, run_stub(StubEngine()) as engine:
        first, second = uid(), uid()
        await api.create_pod(engine_pod("a", engine, first))
        async with start_gateway(api) as fleet:
            await wait_until(lambda: fleet.routable() == {pod_id(engine, first)})
            for _ in range(3):
                assert (await fleet.ask())[0] == 200
            assert fleet.gateway.index.blocks(pod_id(engine, first)) > 0

            # Same name, IP and port, new UID: a StatefulSet pod re-created on
            # the same node. The watch sees DELETED, then ADDED.
            await api.delete_pod("a")
            await api.create_pod(engine_pod("a", engine, second))
            await wait_until(lambda: fleet.routable() == {pod_id(engine, second)})
            assert fleet.gateway.index.blocks(pod_id(engine, first)) == 0
            assert fleet.gateway.index.blocks(pod_id(engine, second)) == 0
            assert (await fleet.ask()) == (200, pod_id(engine, second))


async def test_a_pod_replaced_while_the_watch_was_away_is_told_apart_by_its_uid() -> None:
    async with kube_api() as api, run_stub(StubEngine()) as engine:
        first, second = uid(), uid()
        await api.create_pod(engine_pod("a", engine, first))
        release = api.end_first_watch()
        api.expire_second_watch()  # the resume is refused: too old
        async with start_gateway(api) as fleet:
            await wait_until(lambda: fleet.routable() == {pod_id(engine, first)})
            for _ in range(3):
                assert (await fleet.ask())[0] == 200
            assert fleet.gateway.index.blocks(pod_id(engine, first)) > 0
            # Replaced with no event: only the relist shows it, and only the
            # UID tells that the pod at this address is another one.
            api.emulator.objects[PODS, NAMESPACE, "a"] = engine_pod("a", engine, second)
            release.set()
            await wait_until(lambda: fleet.discovery.lists == 2)
            await wait_until(lambda: fleet.routable() == {pod_id(engine, second)})
            assert fleet.gateway.index.blocks(pod_id(engine, first)) == 0
            assert fleet.gateway.index.blocks(pod_id(engine, second)) == 0


async def test_a_dropped_watch_resumes_from_its_resource_version() -> None:
    async with kube_api() as api, run_stub(StubEngine()) as a, run_stub(StubEngine()) as b:
        ua, ub = uid(), uid()
        await api.create_pod(engine_pod("a", a, ua))
        added_b = engine_pod("b", b, ub)
        # The first watch delivers one event, then its connection ends.
        release = api.end_first_watch({"type": "ADDED", "object": added_b})
        async with start_gateway(api) as fleet:
            await wait_until(lambda: fleet.routable() == {pod_id(a, ua)})
            release.set()
            await wait_until(lambda: len(api.requests(kmock.action.WATCH)) >= 2)
            await wait_until(lambda: fleet.routable() == {pod_id(a, ua), pod_id(b, ub)})
            first, second = api.requests(kmock.action.WATCH)[:2]
            assert first.params["resourceVersion"] == "..."  # the list's (the emulator's only one)
            assert second.params["resourceVersion"] == added_b["metadata"]["resourceVersion"]
            assert len(api.requests(kmock.action.LIST)) == 1  # resumed, not listed again

            # The resumed watch carries on.
            await api.patch_pod("a", {"status": {"conditions": [ready_condition(False)]}})
            await wait_until(lambda: fleet.routable() == {pod_id(b, ub)}, timeout=DROP_WITHIN_S)


async def test_410_gone_lists_again_and_replaces_what_the_watch_missed() -> None:
    async with kube_api() as api, run_stub(StubEngine()) as a, run_stub(StubEngine()) as b, run_stub(StubEngine()) as c:
        ua, ub, uc = uid(), uid(), uid()
        await api.create_pod(engine_pod("a", a, ua))
        await api.create_pod(engine_pod("b", b, ub))
        release = api.end_first_watch()
        api.expire_second_watch()  # the resume is refused: too old
        async with start_gateway(api) as fleet:
            await wait_until(lambda: fleet.routable() == {pod_id(a, ua), pod_id(b, ub)})
            # Changes no watch reports (as if they happened while disconnected
            # for longer than the API server keeps history).
            del api.emulator.objects[PODS, NAMESPACE, "b"]
            api.emulator.objects[PODS, NAMESPACE, "c"] = engine_pod("c", c, uc)
            release.set()
            await wait_until(lambda: fleet.routable() == {pod_id(a, ua), pod_id(c, uc)})
            assert len(api.requests(kmock.action.LIST)) == 2
            assert fleet.discovery.lists == 2


async def test_every_gateway_replica_follows_the_kv_events_of_discovered_pods() -> None:
    context = zmq.asyncio.Context()
    publisher = context.socket(zmq.PUB)  # the engine binds its publisher, as vLLM's `tcp://*:PORT`
    publisher.setsockopt(zmq.LINGER, 0)
    events_port = publisher.bind_to_random_port("tcp://127.0.0.1")
    try:
        # The engine reports 4-token blocks, as its events say: the gateway hashes with the engine's size.
        async with kube_api() as api, run_stub(StubEngine(block_size=4)) as engine:
            u = uid()
            await api.create_pod(engine_pod("a", engine, u, annotations={"kvgate.io/kv-events-port": str(events_port)}))
            async with start_gateway(api, block_size=4) as one, start_gateway(api, block_size=4) as two:
                me = pod_id(engine, u)
                await wait_until(lambda: one.routable() == two.routable() == {me})
                tokens = [1, 2, 3, 4]
                block = hash_block(ROOT_HASH, tokens)
                stored = {"type": "BlockStored", "block_hashes": [77], "parent_block_hash": None,
                          "token_ids": tokens, "block_size": 4, "lora_id": None}
                seq = 0

                def confirmed() -> bool:
                    return all(fleet.gateway.index.match([block]).get(me, 0) == 1 for fleet in (one, two))

                deadline = asyncio.get_running_loop().time() + 5.0
                while not confirmed():  # re-publish: a SUB socket joins late
                    assert asyncio.get_running_loop().time() < deadline, "KV event never reached both indexes"
                    await publisher.send_multipart([b"kv", seq.to_bytes(8, "big"), msgpack.packb([0.0, [stored], 0])])
                    seq += 1
                    await asyncio.sleep(0.05)

                await api.delete_pod("a")
                for fleet in (one, two):
                    await wait_until(lambda: not fleet.gateway.pods)
                    assert fleet.gateway.kv_events is not None and me not in fleet.gateway.kv_events.sources
                    assert fleet.gateway.index.match([block]).get(me, 0) == 0
    finally:
        publisher.close()
        context.term()


@pytest.mark.parametrize(
    "selector",
    [pytest.param((), id="none"), pytest.param(("app",), id="no-equals"), pytest.param(("=x",), id="empty-key")],
)
def test_a_bad_selector_is_refused_at_start_up(selector) -> None:
    settings = fast_settings()
    settings.discovery.kind = "kubernetes"
    settings.discovery.selector = selector
    settings.discovery.kubernetes_api_url = "http://127.0.0.1:1"
    with pytest.raises(ValueError, match="selector"):
        make_discovery(settings.discovery)


async def test_kvgate_serve_with_service_discovery_as_a_process(tmp_path) -> None:
    async with kube_api() as api, run_stub(StubEngine()) as engine, aiohttp.ClientSession() as http:
        u = uid()
        await api.create_pod(engine_pod("a", engine, u))
        config = tmp_path / "gateway.yaml"
        config.write_text(f"discovery: {{kubernetes_api_url: '{api.url}', health_interval_s: 0.1}}\n")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvgate", "serve", "--port", "0", "--config", str(config),
            "--service-discovery", "--selector", "app=engine", "--service-discovery-namespace", NAMESPACE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
            assert line.startswith("gateway: http://"), line
            url = line.split(" ", 1)[1].strip()

            async def ready() -> int:
                async with http.get(url + "/ready") as response:
                    return response.status

            deadline = asyncio.get_running_loop().time() + 30
            while await ready() != 200:
                assert asyncio.get_running_loop().time() < deadline, "the gateway never became ready"
                await asyncio.sleep(0.05)
            payload = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 2}
            async with http.post(url + "/v1/completions", json=payload) as response:
                assert response.status == 200
                assert response.headers["x-kvgate-pod"] == pod_id(engine, u)
            await api.delete_pod("a")
            deadline = asyncio.get_running_loop().time() + 10
            while await ready() != 503:
                assert asyncio.get_running_loop().time() < deadline, "the deleted pod was never dropped"
                await asyncio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_a_malformed_event_does_not_stop_discovery() -> None:
    async with kube_api() as api, run_stub(StubEngine()) as a, run_stub(StubEngine()) as b:
        ua, ub = uid(), uid()
        await api.create_pod(engine_pod("a", a, ua))
        release = api.end_first_watch({"type": "MODIFIED", "object": "not a pod"})
        async with start_gateway(api) as fleet:
            await wait_until(lambda: fleet.routable() == {pod_id(a, ua)})
            release.set()
            await wait_until(lambda: fleet.discovery.lists == 2)  # started over
            await api.create_pod(engine_pod("b", b, ub))
            await wait_until(lambda: fleet.routable() == {pod_id(a, ua), pod_id(b, ub)})
