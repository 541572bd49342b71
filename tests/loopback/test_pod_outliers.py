"""Pods that answer 5xx, 429/503 or hang: retried elsewhere, backed off from or ejected, caches kept.

Real stub pods whose completion answers the test switches, a real gateway in
front, and a real client.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from router.app import GATEWAY, RUNNER_OPTIONS, create_app
from router.discovery import StaticDiscovery
from router.gateway import Gateway
from router.pods import Pod, PodId
from router.settings import Settings
from kvgate.stub_engine import run_app
from tests.loopback.conftest import fast_settings, wait_until
from tests.support.faulty_pod import Answer, FaultyPod, run_faulty

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "tell me a story " * 20}], "max_tokens": 2}
PATH = "/v1/chat/completions"
ROUND_ROBIN = {"x-routing-strategy": "round-robin"}


@dataclass
class Fleet:
    url: str
    gateway: Gateway
    pods: list[FaultyPod]
    http: aiohttp.ClientSession

    def pod(self, faulty: FaultyPod) -> Pod:
        pod = self.gateway.pods.get(PodId(faulty.url))
        assert pod is not None
        return pod

    async def ask(self, payload=CHAT, headers=ROUND_ROBIN) -> tuple[int, dict, str]:
        async with self.http.post(self.url + PATH, json=payload, headers=headers) as r:
            return r.status, await r.json(), r.headers.get("x-kvgate-pod", "")

    def metric(self, name: str, **labels: str) -> float:
        return self.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def settings(**outliers) -> Settings:
    s = fast_settings()
    s.upstream.first_byte_timeout_s = 0.5
    for name, value in outliers.items():
        setattr(s.outliers, name, value)
    return s


@contextlib.asynccontextmanager
async def fleet(n: int = 2, s: Settings | None = None) -> AsyncIterator[Fleet]:
    async with contextlib.AsyncExitStack() as stack:
        pods = [await stack.enter_async_context(run_faulty(FaultyPod())) for _ in range(n)]
        app = create_app(s or settings(), discovery=StaticDiscovery([p.url for p in pods]), rng=random.Random(11))
        url = await stack.enter_async_context(run_app(app, **RUNNER_OPTIONS))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateway = app[GATEWAY]
        await wait_until(lambda: len(gateway.pods.healthy()) == n and all(p.models for p in gateway.pods))
        yield Fleet(url, gateway, pods, http)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Answer(status=500, body=b"Internal Server Error", content_type="text/plain"), id="500-text"),
        pytest.param(Answer(status=500, body=b'{"error": {"message": "engine died"}}'), id="500-json"),
        pytest.param(Answer(status=502, body=b"<html>bad gateway</html>", content_type="text/html"), id="502-html"),
        pytest.param(Answer(status=507, body=b""), id="507-empty"),
        pytest.param(Answer(hang=True), id="hangs"),
    ],
)
async def test_a_broken_pod_is_retried_elsewhere_and_ejected(answer):
    async with fleet() as f:
        bad, good = f.pods
        bad.answers[PATH] = answer
        for _ in range(6):
            status, body, pod = await f.ask()
            assert status == 200, body
            assert pod == good.url
        assert f.pod(bad).ejected and f.pod(bad).healthy
        assert f.metric("kvgate_pod_ejections_total", pod=bad.url) == 1
        assert bad.hits[PATH] == 3  # ejected after three failures: asked no more
        assert all(p.in_flight == 0 for p in f.gateway.pods)


async def test_an_ejected_pod_comes_back_only_after_its_time_and_a_good_probe():
    async with fleet(s=settings(base_ejection_s=1.0)) as f:
        bad, good = f.pods
        bad.answers[PATH] = Answer(status=500)
        pod = f.pod(bad)
        for _ in range(10):
            assert (await f.ask())[0] == 200
            if pod.ejected:
                break
        assert pod.ejected
        del bad.answers[PATH]
        bad.answers["/health"] = Answer(status=503)
        until = f.gateway.outliers.ejected_until(pod)
        assert until is not None
        await wait_until(lambda: f.gateway.outliers.clock() > until)
        await bad.served("/health", times=3)  # probes after the time, all failing
        assert pod.ejected
        del bad.answers["/health"]
        await wait_until(lambda: not pod.ejected)
        served = {(await f.ask())[2] for _ in range(4)}
        assert served == {bad.url, good.url}


async def test_an_overloaded_pod_is_avoided_for_a_while_and_keeps_its_cache():
    async with fleet(s=settings(overload_backoff_s=3.0, max_overload_backoff_s=3.0)) as f:
        kv_aware = {"x-routing-strategy": "kv-aware"}
        status, _, first = await f.ask(headers=kv_aware)
        assert status == 200
        busy = next(p for p in f.pods if p.url == first)
        pod = f.pod(busy)
        held = f.gateway.index.blocks(pod.id)
        assert held > 0
        busy.answers[PATH] = Answer(status=503, body=b"Service Unavailable", content_type="text/plain")
        for _ in range(4):
            status, body, served = await f.ask(headers=kv_aware)
            assert status == 200, body
            assert served != busy.url
        assert busy.hits[PATH] == 2  # the first call, one 503, then avoided during its backoff
        assert pod.healthy and not pod.ejected
        assert f.gateway.index.blocks(pod.id) == held  # its cache is not thrown away under load
        del busy.answers[PATH]
        await wait_until(lambda: pod.backoff_until <= f.gateway.outliers.clock(), timeout=10)
        served = {(await f.ask())[2] for _ in range(4)}
        assert busy.url in served  # back in rotation


async def test_every_pod_overloaded_is_503_with_retry_after():
    async with fleet() as f:
        for p in f.pods:
            p.answers[PATH] = Answer(status=429, body=b"slow down", content_type="text/plain")
        async with f.http.post(f.url + PATH, json=CHAT) as r:
            body = await r.json()
            assert r.status == 503 and r.headers["retry-after"] == "1"
        assert body["error"]["type"] == "service_unavailable" and "slow down" in body["error"]["message"]
        assert not any(p.ejected for p in f.gateway.pods)


async def test_every_pod_broken_is_502_and_the_fleet_is_never_emptied():
    async with fleet() as f:
        for p in f.pods:
            p.answers[PATH] = Answer(status=500, body=b"\xff\xfe not utf-8", content_type="text/plain")
        for _ in range(6):
            status, body, _ = await f.ask()
            assert status == 502
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["type"] == "upstream_unavailable"
        assert sum(p.ejected for p in f.gateway.pods) == 1
        assert f.metric("kvgate_pod_ejections_refused_total", pod=f.pods[0].url) + f.metric(
            "kvgate_pod_ejections_refused_total", pod=f.pods[1].url
        ) >= 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(Answer(status=400, body=b"prompt too long", content_type="text/plain"), "prompt too long", id="text"),
        pytest.param(Answer(status=422, body=b"<html><b>Unprocessable</b></html>", content_type="text/html"), "<html>", id="html"),
        pytest.param(Answer(status=400, body=b'{"detail": [1, 2]}'), '{"detail": [1, 2]}', id="other-json"),
        pytest.param(Answer(status=400, body=b'{"message": "bad n"}'), "bad n", id="message-json"),
        pytest.param(Answer(status=404, body=b""), "404", id="empty"),
    ],
)
async def test_a_pods_non_openai_error_reaches_the_client_openai_shaped(answer, message):
    async with fleet(1) as f:
        f.pods[0].answers[PATH] = answer
        status, body, pod = await f.ask()
        assert status == answer.status and pod == f.pods[0].url
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert message in body["error"]["message"]
        assert f.pods[0].hits[PATH] == 1  # the client's fault: not retried
        assert not f.pod(f.pods[0]).ejected


async def test_a_pods_openai_error_object_passes_through_unchanged():
    error = {"message": "This model's maximum context length is 4096 tokens", "type": "BadRequestError", "param": None, "code": 400}
    async with fleet(1) as f:
        f.pods[0].answers[PATH] = Answer(status=400, body=json.dumps({"object": "error", "error": error}).encode())
        status, body, _ = await f.ask()
        assert status == 400 and body == {"error": error}
