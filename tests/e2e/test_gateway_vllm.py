"""The gateway in front of real vLLM CPU engines, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import openai
import pytest

from router.app import GATEWAY, create_app
from router.connections import serving
from router.discovery import StaticDiscovery
from router.gateway import Gateway
from router.settings import Settings
from router.tokenize import PromptTokenizer

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"


@dataclass
class Front:
    url: str
    gateway: Gateway
    client: openai.AsyncOpenAI
    tokenizer: PromptTokenizer


@contextlib.asynccontextmanager
async def front(
    engine_urls: list[str], model_dir, policy: str = "kv-aware", event_sources: list[str] | None = None
) -> AsyncIterator[Front]:
    settings = Settings()
    settings.discovery.kv_event_sources = tuple(event_sources or ())
    settings.routing.policy = policy
    settings.routing.tokenizer = model_dir
    settings.discovery.health_interval_s = 0.2
    settings.scrape.interval_s = 0.2
    tokenizer = PromptTokenizer.from_model_dir(model_dir)
    app = create_app(settings, discovery=StaticDiscovery(engine_urls), encoder=tokenizer, rng=random.Random(1))
    async with serving(app, settings.server) as url:
        gateway = app[GATEWAY]
        for _ in range(300):
            if len(gateway.pods.healthy()) == len(engine_urls) and all(p.stats.num_gpu_blocks for p in gateway.pods):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("engines never became healthy behind the gateway")
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            yield Front(url, gateway, client, tokenizer)
        finally:
            await client.close()


@pytest.fixture
async def gw(vllm_engines, tiny_model_dir) -> AsyncIterator[Front]:
    async with front([e.url for e in vllm_engines], tiny_model_dir) as f:
        yield f


MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three prime numbers."},
]


async def test_chat_completion_through_the_gateway(gw):
    reply = await gw.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens == 5
    # The gateway tokenised exactly what the engine did.
    assert reply.usage.prompt_tokens == len(gw.tokenizer.encode_chat(MESSAGES))


async def test_chat_stream_through_the_gateway(gw):
    stream = await gw.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True, temperature=0)
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    whole = await gw.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert pieces and "".join(pieces) == whole.choices[0].message.content


async def test_completions_through_the_gateway(gw):
    reply = await gw.client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4
    assert reply.usage.prompt_tokens == len(gw.tokenizer.encode_prompt("The quick brown fox"))
    stream = await gw.client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].usage.completion_tokens == 4


async def test_unknown_model_and_bad_input_through_the_client(gw):
    with pytest.raises(openai.NotFoundError):
        await gw.client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        await gw.client.chat.completions.create(model=MODEL, messages=[{"role": "user"}], max_tokens=10**9)
    models = await gw.client.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_engine_kv_events_confirm_and_correct_the_index(vllm_engines, vllm_event_sources, tiny_model_dir):
    urls = [e.url for e in vllm_engines]
    async with front(urls, tiny_model_dir, "round-robin", vllm_event_sources) as f, aiohttp.ClientSession() as http:
        listener = f.gateway.kv_events
        assert listener is not None
        prompt = shared_prefix_workload(1, 400, 1)[0]
        # Until the engines' publishers have connected, events are lost: retry.
        for _ in range(40):
            await f.client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=1)
            if sum(e.stored for e in listener.engines.values()) > 0:
                break
            await asyncio.sleep(0.25)
        assert sum(e.stored for e in listener.engines.values()) > 0
        # Fill one engine far past its capacity: it evicts, and says so.
        target = urls[0]
        for i in range(12):
            await f.client.chat.completions.create(
                model=MODEL, messages=shared_prefix_workload(1, 400, 1, seed=100 + i)[0], max_tokens=1,
                extra_headers={"x-routing-strategy": "session-affinity", "x-session-id": "pin"},
            )
        for _ in range(100):  # the engine publishes its evictions with its next steps
            if sum(e.removed for e in listener.engines.values()) > 0:
                break
            await asyncio.sleep(0.05)
        assert sum(e.removed for e in listener.engines.values()) > 0
        for pod in f.gateway.pods:
            assert f.gateway.index.blocks(pod.id) <= pod.stats.num_gpu_blocks
        # Resetting an engine's prefix cache empties its entries. The engine
        # publishes that with its next step: give each a short request (no full
        # block, so nothing new to store).
        for url in urls:
            async with http.post(url + "/reset_prefix_cache") as r:
                assert r.status == 200
        for _ in range(len(urls)):
            await f.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        for _ in range(40):
            if all(f.gateway.index.blocks(pod.id) == 0 for pod in f.gateway.pods):
                break
            await asyncio.sleep(0.1)
        assert all(f.gateway.index.blocks(pod.id) == 0 for pod in f.gateway.pods), target


# --- prefix-cache hit rates under cache pressure, by policy -----------------------------------

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def shared_prefix_workload(groups: int, prefix_words: int, rounds: int, seed: int = 5) -> list[list[dict]]:
    """`groups` long system prompts, each asked `rounds` short questions; every round visits the groups in a new order."""
    rng = random.Random(seed)
    systems = [f"Group {g} rules: " + " ".join(rng.choice(WORDS) for _ in range(prefix_words)) for g in range(groups)]
    requests = []
    for r in range(rounds):
        order = list(range(groups))
        rng.shuffle(order)
        for g in order:
            requests.append([{"role": "system", "content": systems[g]}, {"role": "user", "content": f"question {r} for {g}"}])
    return requests


async def _engine_counters(http: aiohttp.ClientSession, urls: list[str]) -> tuple[float, float]:
    from router.scrape import parse_engine_metrics

    queries = hits = 0.0
    for url in urls:
        async with http.get(url + "/metrics") as r:
            stats = parse_engine_metrics(await r.text())
        queries += stats.prefix_queries
        hits += stats.prefix_hits
    return queries, hits


async def _hit_rate(urls: list[str], model_dir, policy: str, workload: list[list[dict]]) -> float:
    async with aiohttp.ClientSession() as http:
        for url in urls:
            async with http.post(url + "/reset_prefix_cache") as r:
                assert r.status == 200, "engines must run with VLLM_SERVER_DEV_MODE=1"
        async with front(urls, model_dir, policy) as f:
            q0, h0 = await _engine_counters(http, urls)
            for messages in workload:
                await f.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
            q1, h1 = await _engine_counters(http, urls)
    return (h1 - h0) / (q1 - q0)


async def test_cache_aware_policies_beat_round_robin_on_engine_reported_hits(vllm_engines, tiny_model_dir):
    urls = [e.url for e in vllm_engines]
    tokenizer = PromptTokenizer.from_model_dir(tiny_model_dir)
    async with front(urls, tiny_model_dir) as f:
        capacity = min(p.stats.num_gpu_blocks for p in f.gateway.pods)
        block = f.gateway.block_size
    # Size the workload from the engines' real capacity: the prefixes together
    # need about 1.6 engines' worth of KV, so one engine cannot hold them all
    # but two engines that split them can.
    probe = shared_prefix_workload(1, 600, 1)[0]
    prefix_blocks = len(tokenizer.encode_chat(probe)) // block
    groups = max(4, round(1.6 * capacity / prefix_blocks))
    workload = shared_prefix_workload(groups, 600, rounds=4)

    rates = {policy: await _hit_rate(urls, tiny_model_dir, policy, workload) for policy in ("round-robin", "prefix-cache", "kv-aware")}
    print(f"engine-reported prefix hit rate ({groups} groups x {prefix_blocks} blocks, capacity {capacity}): {rates}")
    # The first visit of each group must miss: 3 of 4 rounds can hit at best.
    for policy in ("prefix-cache", "kv-aware"):
        assert rates[policy] >= rates["round-robin"] + 0.15, rates
        assert rates[policy] >= 1.3 * rates["round-robin"], rates
        assert rates[policy] <= 0.75 + 0.02, rates
