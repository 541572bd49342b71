"""kv-aware over real vLLM CPU engines sharing kvgate's tiered KV cache: a busy holder's prefix is loaded elsewhere.

Two engines load `TieredKVConnector` (L2 cache nodes, L3 Redis) and send
their KV events to the gateway. A long prompt is computed on one engine
through the gateway; that engine is then kept busy with decode streams sent
to it directly (the gateway sees them in its scrapes). The same prompt sent
again goes to the other engine, which loads the prefix from the shared cache
(its external prefix-cache hits grow) instead of recomputing it, and answers
the same greedy text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from router.app import GATEWAY, create_app
from router.connections import serving
from router.discovery import StaticDiscovery
from router.gateway import Gateway
from router.settings import Settings
from router.tokenize import PromptTokenizer
from tests.support.kvcache_cluster import SharedCacheCluster, metric, shared_cache_cluster

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
BLOCK = 128
PROMPT_TOKENS = 3000
#: Blocks the connector may load: full blocks, never the one holding the last token.
LOADABLE = (PROMPT_TOKENS - 1) // BLOCK
HITS = "vllm:external_prefix_cache_hits_total"
#: Decode streams that keep the holder busy: 32 streams x d = 32 prefill tokens each (1,024) outweigh
#: loading 2,944 tokens at any load ratio below about 0.33.
BUSY_STREAMS = 32


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCacheCluster]:
    # 128 blocks: the prefix (23) and every busy stream (at most 3 blocks each) fit, so the holder keeps the prefix.
    directory = tmp_path_factory.mktemp("tier-routing")
    with shared_cache_cluster(directory, tiny_model_dir, num_gpu_blocks=128, kv_events=True) as running:
        yield running


@contextlib.asynccontextmanager
async def gateway(cluster: SharedCacheCluster, model_dir: Path) -> AsyncIterator[tuple[str, Gateway]]:
    settings = Settings()
    settings.discovery.worker_urls = tuple(engine.url for engine in cluster.engines)
    settings.discovery.kv_event_sources = tuple(cluster.event_sources)
    settings.discovery.health_interval_s = 0.2
    settings.scrape.interval_s = 0.2
    settings.routing.tokenizer = model_dir
    app = create_app(
        settings,
        discovery=StaticDiscovery(settings.discovery.worker_urls),
        encoder=PromptTokenizer.from_model_dir(model_dir),
        rng=random.Random(1),
    )
    async with serving(app, settings.server) as url:
        gw = app[GATEWAY]
        await until(lambda: len(gw.pods.healthy()) == len(cluster.engines) and all(p.stats.num_gpu_blocks for p in gw.pods))
        yield url, gw


async def until(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def complete(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int = 8) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    async with session.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=300)) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["choices"][0]["text"]


async def decode_stream(session: aiohttp.ClientSession, url: str, seed: int) -> None:
    """A decode of 300 tokens on one engine, sent to it directly."""
    body = {
        "model": MODEL, "prompt": [5 + seed % 900, 7, 9], "max_tokens": 300, "ignore_eos": True,
        "temperature": 0, "stream": True,
    }  # fmt: skip
    headers = {"content-type": "application/json"}
    async with session.post(url + "/v1/completions", data=json.dumps(body), headers=headers) as response:
        async for _ in response.content:
            pass


async def test_a_prefix_computed_on_a_busy_engine_is_loaded_not_recomputed_on_the_other(
    cluster: SharedCacheCluster, tiny_model_dir: Path
) -> None:
    prompt = [random.Random(11).randrange(5, 1000) for _ in range(PROMPT_TOKENS)]
    async with gateway(cluster, tiny_model_dir) as (url, gw), aiohttp.ClientSession() as session:
        expected = await complete(session, url, prompt)
        _, request, _, holder_id, *_ = gw.router.decisions[-1]
        holder = gw.pods.get(holder_id)
        other = next(pod for pod in gw.pods if pod is not holder)
        # The holder's engine reported storing the prefix (its KV events), and its connector saved it.
        await until(lambda: gw.shared.run(request.block_hashes, 0, LOADABLE) == LOADABLE)
        await until(lambda: gw.shared_use.active)
        # NOTE: L2 writes are behind the request and may time out on a loaded machine; L3 then holds the blocks.
        deadline = asyncio.get_running_loop().time() + 120
        while await cluster.l2_blocks() < LOADABLE and await asyncio.to_thread(cluster.l3_blocks) < LOADABLE:
            assert asyncio.get_running_loop().time() < deadline, "the prefix never reached L2 or L3"
            await asyncio.sleep(0.1)

        streams = [asyncio.create_task(decode_stream(session, holder.url, i)) for i in range(BUSY_STREAMS)]
        try:
            await until(lambda: holder.stats.running + holder.stats.waiting >= BUSY_STREAMS)
            hits = await asyncio.to_thread(metric, other.url, HITS)
            answer = await complete(session, url, prompt)
            _, routed, _, chosen, *_ = gw.router.decisions[-1]
            loaded = await asyncio.to_thread(metric, other.url, HITS) - hits
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)

    assert routed.matched_blocks.get(holder.id, 0) >= LOADABLE, "the holder still had the prefix on its GPU"
    assert chosen == other.id, "the busy holder lost to the idle engine that can load the prefix"
    assert loaded > 0, "the other engine loaded the prefix (external hits), not recomputed it"
    assert answer == expected
