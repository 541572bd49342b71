"""Three gateway replicas sharing routing state hit the engines' prefix caches as well as one gateway.

Real vLLM CPU engines (the session's two), in-process gateways, a private
redis-server for the shared state. The same shared-prefix workload, sized so
that the prefixes need about 1.6 engines' worth of KV, is sent once through
one gateway and once through three replicas, each request to the next
replica in turn; the engines' own prefix-cache counters decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from kvgate.stub_engine import run_app
from router.app import GATEWAY, RUNNER_OPTIONS, create_app
from router.discovery import StaticDiscovery
from router.settings import Settings
from router.tokenize import PromptTokenizer
from tests.e2e.conftest import E2E_BLOCK_SIZE, E2E_NUM_GPU_BLOCKS
from tests.e2e.test_gateway_vllm import MODEL, _engine_counters, shared_prefix_workload
from tests.support.kvcache_servers import RedisServer

#: 3 replicas must reach this share of one gateway's engine hit rate.
HIT_RATIO_TARGET = 0.95


@pytest.fixture
def redis_url(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    yield server.url
    server.stop()


@contextlib.asynccontextmanager
async def gateways(engine_urls: list[str], model_dir: Path, count: int, state_url: str | None) -> AsyncIterator[list[str]]:
    tokenizer = PromptTokenizer.from_model_dir(model_dir)
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for i in range(count):
            settings = Settings()
            settings.routing.tokenizer = model_dir
            settings.discovery.health_interval_s = 0.2
            settings.scrape.interval_s = 0.2
            settings.state.url = state_url
            settings.state.cluster = "e2e"
            app = create_app(settings, discovery=StaticDiscovery(engine_urls), encoder=tokenizer, rng=random.Random(i))
            urls.append(await stack.enter_async_context(run_app(app, **RUNNER_OPTIONS)))
            gateway = app[GATEWAY]
            for _ in range(300):
                if gateway.ready() and all(p.stats.num_gpu_blocks for p in gateway.pods):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("engines never became ready behind the gateway")
        yield urls


async def _hit_rate(engine_urls: list[str], gateway_urls: list[str], workload: list[list[dict]]) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        for url in engine_urls:
            async with http.post(url + "/reset_prefix_cache") as r:
                assert r.status == 200
        q0, h0 = await _engine_counters(http, engine_urls)
        for i, messages in enumerate(workload):
            body = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
            async with http.post(gateway_urls[i % len(gateway_urls)] + "/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
        await asyncio.sleep(0.5)  # the engines' counters trail the last answer by a step
        q1, h1 = await _engine_counters(http, engine_urls)
    return (h1 - h0) / (q1 - q0)


async def test_three_replicas_with_shared_state_hit_as_well_as_one(vllm_engines, tiny_model_dir, redis_url):
    engine_urls = [e.url for e in vllm_engines]
    tokenizer = PromptTokenizer.from_model_dir(tiny_model_dir)
    capacity = E2E_NUM_GPU_BLOCKS
    probe = shared_prefix_workload(1, 600, 1)[0]
    prefix_blocks = len(tokenizer.encode_chat(probe)) // E2E_BLOCK_SIZE
    groups = max(4, round(1.6 * capacity / prefix_blocks))
    workload = shared_prefix_workload(groups, 600, rounds=3)

    async with gateways(engine_urls, tiny_model_dir, 1, None) as one:
        single = await _hit_rate(engine_urls, one, workload)
    async with gateways(engine_urls, tiny_model_dir, 3, redis_url) as three:
        shared = await _hit_rate(engine_urls, three, workload)

    print(f"engine-reported hit rate, {groups} groups x {prefix_blocks} blocks: one gateway {single:.3f}, 3 replicas {shared:.3f}")
    assert single > 0.3, "the workload must reward cache-aware routing"
    assert shared >= HIT_RATIO_TARGET * single, (single, shared)
