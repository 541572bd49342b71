"""A pod's load: the gateway's own requests counted live, the engine's scraped count only for what others sent.

The engine's running count is as old as its last scrape; the gateway's count
of its own requests is current. The monitor records the gateway's count with
each scrape, so what the engine had beyond it is others' work.
"""

from __future__ import annotations

import asyncio

import pytest

from kvgate.stub_engine import StubBehaviour
from tests.loopback.conftest import start_cluster, wait_until

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 2}


async def test_the_engine_count_beyond_the_gateways_is_others_and_only_that_is_read_from_the_scrape():
    async with start_cluster(1, behaviour=StubBehaviour(delay_s=1.0)) as cluster:
        engine = cluster.engines[0]
        pod = cluster.gateway.pods.get(engine.url)

        async def through_gateway():
            async with await cluster.post("/v1/chat/completions", CHAT) as r:
                assert r.status == 200, await r.text()
                await r.read()

        async def around_it():
            async with cluster.http.post(engine.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                await r.read()

        calls = [asyncio.create_task(through_gateway()) for _ in range(2)] + [asyncio.create_task(around_it())]
        await wait_until(lambda: pod.stats.running == 3 and pod.in_flight == 2)
        await wait_until(lambda: pod.stats.gateway_in_flight == 2)
        seen = (pod.stats.others, pod.load)
        await asyncio.gather(*calls)

        # Both gateway requests are over; the last scrape may still show them running.
        assert pod.in_flight == 0 and pod.load == pod.stats.others

    assert seen == (1, 3)


@pytest.mark.parametrize(
    ("restricted", "page"),
    [
        pytest.param(True, "restricted", id="an-engine-that-serves-its-series-alone-is-asked-for-them-alone"),
        pytest.param(False, "full", id="one-that-cannot-is-scraped-whole"),
    ],
)
async def test_the_monitor_asks_for_the_series_it_reads_only(restricted, page):
    async with start_cluster(1, restricted_metrics=restricted, num_gpu_blocks=77) as cluster:
        engine = cluster.engines[0]
        pod = cluster.gateway.pods.get(engine.url)
        engine.running = 5
        await wait_until(lambda: pod.stats.running == 5 and pod.stats.num_gpu_blocks == 77)
        served = dict(engine.scrapes)

    assert set(served) == {page}


async def test_pods_are_asked_for_uncompressed_answers_since_the_gateway_passes_bodies_on_as_sent():
    async with start_cluster(1) as cluster:
        async with await cluster.post("/v1/chat/completions", CHAT) as r:
            assert r.status == 200, await r.text()
            await r.read()
        sent = cluster.engines[0].calls

    assert [c["headers"].get("Accept-Encoding") for c in sent] == ["identity"]
