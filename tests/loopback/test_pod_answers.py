"""A pod answering its probes and scrapes badly: the monitor goes on, and follows the pod when it recovers.

Every pod here is a real stub server whose /health, /v1/models and /metrics
answers the test switches; the gateway is real and probes every 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest

from router.app import GATEWAY, RUNNER_OPTIONS, create_app
from router.discovery import StaticDiscovery
from router.gateway import Gateway
from router.pods import Pod, PodEndpoint, PodId
from kvgate.stub_engine import run_app
from tests.loopback.conftest import fast_settings, wait_until
from tests.support.faulty_pod import Answer, FaultyPod, run_faulty

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 2}


@contextlib.asynccontextmanager
async def gateway_for(*pods: FaultyPod, discovery=None) -> AsyncIterator[tuple[str, Gateway]]:
    app = create_app(
        fast_settings(), discovery=discovery or StaticDiscovery([p.url for p in pods]), rng=random.Random(3)
    )
    async with run_app(app, **RUNNER_OPTIONS) as url:
        yield url, app[GATEWAY]


def pod_of(gateway: Gateway, faulty: FaultyPod) -> Pod:
    pod = gateway.pods.get(PodId(faulty.url))
    assert pod is not None
    return pod


def errors_counted(gateway: Gateway, task: str) -> float:
    samples = gateway.metrics.registry.collect()
    return sum(
        s.value
        for family in samples
        if family.name == "kvgate_background_errors"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["task"] == task
    )


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Answer(body=b"[]"), id="empty-list"),
        pytest.param(Answer(body=b'"tiny-llama"'), id="json-string"),
        pytest.param(Answer(body=b"null"), id="null"),
        pytest.param(Answer(body=b'{"data": "tiny-llama"}'), id="data-not-a-list"),
        pytest.param(Answer(body=b'{"data": [1, "x", null]}'), id="entries-not-objects"),
        pytest.param(Answer(body=b'{"data": [{"id": ["tiny-llama"]}]}'), id="id-unhashable"),
        pytest.param(Answer(body=b'{"data": []}'), id="no-models"),
        pytest.param(Answer(body=b"\xff\xfe\x00garbage"), id="invalid-utf8"),
        pytest.param(Answer(body=b"[" * 100_000), id="nested-too-deep"),
        pytest.param(Answer(body=b"<html>oops</html>", content_type="text/html"), id="html"),
        pytest.param(Answer(status=500, body=b"boom"), id="status-500"),
    ],
)
async def test_a_bad_model_list_keeps_the_pod_out_until_it_recovers(answer):
    async with run_faulty(FaultyPod()) as faulty:
        faulty.answers["/v1/models"] = answer
        async with gateway_for(faulty) as (url, gateway):
            await faulty.served("/v1/models", times=3)  # three bad answers in a row, the watcher still asks
            pod = pod_of(gateway, faulty)
            assert not pod.healthy and not pod.models
            del faulty.answers["/v1/models"]
            await wait_until(lambda: pod.healthy and pod.models == frozenset({"tiny-llama"}))
            async with aiohttp.ClientSession() as http, http.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200, await r.text()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"vllm:num_requests_running 1.0\n\xff\xfe\xfd invalid utf-8\n", id="invalid-utf8"),
        pytest.param(b"vllm:num_requests_running NaN\nvllm:num_requests_waiting +Inf\n", id="nan-and-inf"),
        pytest.param(b"vllm:num_requests_running 1e999\n", id="overflow"),
        pytest.param('vllm:cache_config_info{block_size="\u00b2",num_gpu_blocks="\u0663"} 1\n'.encode(), id="unicode-digits"),
        pytest.param(b'vllm:cache_config_info{num_gpu_blocks="' + b"9" * 5000 + b'"} 1\n', id="huge-label"),
        pytest.param(b"\x00\x01\x02{{{}}} \n vllm:num_requests_running{ \n#\n{\n", id="binary-junk"),
        pytest.param(bytes(random.Random(5).randrange(256) for _ in range(4096)), id="random-bytes"),
    ],
)
async def test_a_garbage_scrape_does_not_stop_health_probes(body):
    async with run_faulty(FaultyPod()) as faulty:
        async with gateway_for(faulty) as (_, gateway):
            pod = pod_of(gateway, faulty)
            await wait_until(lambda: pod.healthy)
            faulty.answers["/metrics"] = Answer(body=body, content_type="text/plain")
            await faulty.served("/metrics", times=2)
            faulty.answers["/health"] = Answer(status=503)
            await wait_until(lambda: not pod.healthy)
            del faulty.answers["/health"]
            await wait_until(lambda: pod.healthy)
            assert pod.stats.block_size in (None, 16) and pod.stats.running >= 0


async def test_a_truncated_scrape_does_not_cost_the_pod_its_cache():
    """Counters missing from one scrape are not counters that went backwards (a restart)."""
    async with run_faulty(FaultyPod()) as faulty:
        async with gateway_for(faulty) as (url, gateway):
            pod = pod_of(gateway, faulty)
            await wait_until(lambda: pod.healthy)
            async with aiohttp.ClientSession() as http, http.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            await wait_until(lambda: pod.stats.prefix_queries > 0)
            held = gateway.index.blocks(pod.id)
            assert held > 0
            faulty.answers["/metrics"] = Answer(body=b"# the engine is busy\n", content_type="text/plain")
            await faulty.served("/metrics", times=3)
            assert gateway.index.blocks(pod.id) == held


async def test_an_engine_restart_still_forgets_the_pods_cache():
    async with run_faulty(FaultyPod()) as faulty:
        async with gateway_for(faulty) as (url, gateway):
            pod = pod_of(gateway, faulty)
            await wait_until(lambda: pod.healthy)
            async with aiohttp.ClientSession() as http, http.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            await wait_until(lambda: pod.stats.prefix_queries > 0)
            assert gateway.index.blocks(pod.id) > 0
            faulty.engine.restart()  # its counters start again from zero
            await wait_until(lambda: gateway.index.blocks(pod.id) == 0)


async def test_a_pod_down_for_a_while_keeps_its_cache():
    async with run_faulty(FaultyPod()) as faulty:
        async with gateway_for(faulty) as (url, gateway):
            pod = pod_of(gateway, faulty)
            await wait_until(lambda: pod.healthy)
            async with aiohttp.ClientSession() as http, http.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            held = gateway.index.blocks(pod.id)
            assert held > 0
            faulty.answers["/health"] = Answer(status=503)
            await wait_until(lambda: not pod.healthy)
            assert gateway.index.blocks(pod.id) == held
            del faulty.answers["/health"]
            await wait_until(lambda: pod.healthy)
            assert gateway.index.blocks(pod.id) == held


class FlakyDiscovery:
    """Raises on its first run, as a discovery whose API call failed would."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = frozenset(urls)
        self.runs = 0

    async def run(self, on_change) -> None:  # noqa: ANN001 - the OnChange callback
        self.runs += 1
        if self.runs == 1:
            raise ConnectionError("the pod list could not be fetched")
        on_change(frozenset(PodEndpoint.of(url) for url in self.urls))
        await asyncio.Event().wait()


async def test_discovery_that_fails_is_restarted_and_counted():
    async with run_faulty(FaultyPod()) as faulty:
        discovery = FlakyDiscovery([faulty.url])
        async with gateway_for(faulty, discovery=discovery) as (_, gateway):
            await wait_until(lambda: len(gateway.pods.healthy()) == 1)
            assert discovery.runs == 2
            assert errors_counted(gateway, "discovery") == 1


def engine_metrics(started: float, queries: int) -> Answer:
    text = (
        f"process_start_time_seconds {started}\nvllm:prefix_cache_queries_total {queries}\n"
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="64"} 1.0\n'
    )
    return Answer(body=text.encode(), content_type="text/plain")


async def test_an_engine_restart_is_told_by_its_start_time_even_when_its_counters_grew():
    """Other gateways may have sent the new engine more traffic than the old one had seen."""
    async with run_faulty(FaultyPod()) as faulty:
        faulty.answers["/metrics"] = engine_metrics(1000.0, 500)
        async with gateway_for(faulty) as (url, gateway):
            pod = pod_of(gateway, faulty)
            await wait_until(lambda: pod.stats.started_at == 1000.0 and gateway.block_size == 16)
            async with aiohttp.ClientSession() as http, http.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            held = gateway.index.blocks(pod.id)
            assert held > 0
            faulty.answers["/metrics"] = engine_metrics(1000.4, 600)  # same process, a jittery clock
            await faulty.served("/metrics", times=3)
            assert gateway.index.blocks(pod.id) == held
            faulty.answers["/metrics"] = engine_metrics(1900.0, 9000)  # a new process
            await wait_until(lambda: gateway.index.blocks(pod.id) == 0)


async def test_a_bad_model_list_is_counted():
    async with run_faulty(FaultyPod()) as faulty:
        faulty.answers["/v1/models"] = Answer(body=b"[]")
        async with gateway_for(faulty) as (_, gateway):
            await faulty.served("/v1/models", times=3)  # the third asked: the first two were counted
            assert errors_counted(gateway, "probe") >= 2
