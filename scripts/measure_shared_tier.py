#!/usr/bin/env python
"""How often the gateway's belief of the shared KV cache is right, for each way of feeding it.

Starts a private Redis (L3), two cache nodes (L2) and two real vLLM CPU
engines loading the tiered connector and sending their KV events
(`tests.support.kvcache_cluster`), and the gateway in process in front of
them (kv-aware, shared-tier pricing on). Then runs steps through the gateway:

- ``burst``: four requests at once sharing a new 2,500-token prefix, while
  the GPUs have room (a second pod takes part of the burst);
- ``cold``: distinct 2,500-token prompts, more than both GPU caches hold;
- ``return``: the same prompts again, in another order (their blocks left
  the GPUs: loaded from L1/L2/L3, or recomputed);
- ``chat``: multi-turn chats, each turn the history plus 300 new tokens.

After each step it compares, per engine, the tokens the belief predicted the
step's requests would load (`kvgate_shared_tier_predicted_tokens_total`, one
series per feed: KV events, routing decisions, both) with the external hits
the engine reports (`vllm:external_prefix_cache_hits_total`). A step is
"right" for a feed when the two agree within one block on every engine.

Run from the repository root::

    PYTHONPATH=. python scripts/measure_shared_tier.py

It also prints the load-cost ratio the gateway learned from the engines'
figures, next to the one measured directly (median prefill seconds per
token of the ``return`` requests that loaded, over those of ``cold``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from kvcache.keys import chain_hashes  # noqa: E402
from kvgate.model import build_model  # noqa: E402
from router.app import GATEWAY, create_app  # noqa: E402
from router.connections import serving  # noqa: E402
from router.discovery import StaticDiscovery  # noqa: E402
from router.gateway import Gateway  # noqa: E402
from router.settings import Settings  # noqa: E402
from router.shared_tier import FEED_MASKS  # noqa: E402
from router.tokenize import PromptTokenizer  # noqa: E402
from tests.support.kvcache_cluster import SharedCacheCluster, metric, shared_cache_cluster  # noqa: E402

MODEL = "tiny-llama"
BLOCK = 128
HITS = "vllm:external_prefix_cache_hits_total"
LOCAL_HITS = "vllm:prefix_cache_hits_total"


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 1000) for _ in range(n)]


async def complete(session: aiohttp.ClientSession, url: str, prompt: Sequence[int]) -> float:
    body = {"model": MODEL, "prompt": list(prompt), "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=600)) as response:
        await response.read()
        assert response.status == 200
    return time.perf_counter() - started


class Ledger:
    """Per step: each feed's predicted tokens vs the engines' reported loads."""

    def __init__(self, gw: Gateway, cluster: SharedCacheCluster, verbose: bool) -> None:
        self.gw, self.cluster, self.verbose = gw, cluster, verbose
        self.rows: list[tuple[str, dict[str, dict[str, float]], dict[str, float]]] = []
        self.given_gpu: dict[str, list[bool]] = {}

    def runs(self, prompt: Sequence[int]) -> dict[str, list[int]]:
        """Per feed, the blocks the belief says a pod holding the first s blocks can load, for every s."""
        hashes = chain_hashes(list(prompt), BLOCK)
        limit = min((len(prompt) - 1) // BLOCK, len(hashes))
        return {feed: [self.gw.shared.run(hashes, s, limit, mask) for s in range(limit + 1)] for feed, mask in FEED_MASKS.items()}

    def predicted(self) -> dict[str, dict[str, float]]:
        registry = self.gw.metrics.registry
        return {
            feed: {
                e.url: registry.get_sample_value("kvgate_shared_tier_predicted_tokens_total", {"pod": e.url, "feed": feed}) or 0.0
                for e in self.cluster.engines
            }
            for feed in FEED_MASKS
        }

    async def loaded(self, name: str = HITS) -> dict[str, float]:
        # Hits are counted when a request is scheduled; read until two reads agree.
        last = None
        while True:
            now = {e.url: await asyncio.to_thread(metric, e.url, name) for e in self.cluster.engines}
            if now == last:
                return now
            last = now
            await asyncio.sleep(0.3)

    async def step(self, name: str, work, prompt: Sequence[int] | None = None, requests: int = 1) -> list[float]:  # type: ignore[no-untyped-def]
        before_p, before_h = self.predicted(), await self.loaded()
        before_local = await self.loaded(LOCAL_HITS)
        runs = self.runs(prompt) if prompt is not None else None
        seconds = await work
        after_p, after_h = self.predicted(), await self.loaded()
        after_local = await self.loaded(LOCAL_HITS)
        delta_p = {f: {u: after_p[f][u] - before_p[f][u] for u in after_p[f]} for f in after_p}
        delta_h = {u: after_h[u] - before_h[u] for u in after_h}
        self.rows.append((name, delta_p, delta_h))
        if runs is not None:
            # The belief alone, given the GPU hit the engine really had: did it know what the engine loaded?
            for url, loaded in delta_h.items():
                gpu = round((after_local[url] - before_local[url]) / BLOCK)
                if gpu or loaded:
                    for feed, run in runs.items():
                        self.given_gpu.setdefault(feed, []).append(run[min(gpu, len(run) - 1)] == round(loaded / BLOCK))
        if self.verbose:
            engines = {e.url: f"e{i}" for i, e in enumerate(self.cluster.engines)}
            routed = [
                f"{engines[pod]}(gpu belief {req.matched_blocks.get(pod, 0)})"
                for _, req, _, pod, *_ in list(self.gw.router.decisions)[-requests:]
            ]
            cells = [
                f"{engines[u]}: gpu hit {after_local[u] - before_local[u]:.0f} loaded {delta_h[u]:.0f} "
                f"predicted {delta_p['events'][u]:.0f}/{delta_p['decisions'][u]:.0f}"
                for u in delta_h
            ]
            print(f"{name:<7} -> {' '.join(routed)}; " + "; ".join(cells), flush=True)
        return seconds if isinstance(seconds, list) else [seconds]

    def report(self) -> None:
        print(f"\n{'feed':<10} {'steps right':>12} {'predicted':>10} {'loaded':>10} {'over':>8} {'under':>8} {'error':>7}")
        loaded_total = sum(sum(h.values()) for _, _, h in self.rows)
        for feed in FEED_MASKS:
            right = over = under = predicted = 0.0
            for _, p, h in self.rows:
                errors = [p[feed][u] - h[u] for u in h]
                right += all(abs(e) < BLOCK for e in errors)
                over += sum(e for e in errors if e > 0)
                under += sum(-e for e in errors if e < 0)
                predicted += sum(p[feed].values())
            error = (over + under) / loaded_total if loaded_total else 0.0
            print(f"{feed:<10} {int(right):>5} of {len(self.rows):<5} {predicted:>10.0f} {loaded_total:>10.0f} {over:>8.0f} {under:>8.0f} {error:>7.1%}")
        print("\nthe belief alone, given the engine's real GPU hit (sequential requests that hit or loaded):")
        for feed, right in self.given_gpu.items():
            print(f"  {feed:<10} {sum(right)} of {len(right)} right")
        print("\nper kind of step (events / decisions / both right):")
        kinds: dict[str, list[int]] = {}
        for name, p, h in self.rows:
            counts = kinds.setdefault(name, [0, 0, 0, 0])
            counts[3] += 1
            for i, feed in enumerate(FEED_MASKS):
                counts[i] += all(abs(p[feed][u] - h[u]) < BLOCK for u in h)
        for name, (e, d, b, n) in kinds.items():
            print(f"  {name:<8} {e}/{n}  {d}/{n}  {b}/{n}")


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="measure-shared-tier-") as work:
        await measure(Path(work), args)


async def measure(work_dir: Path, args: argparse.Namespace) -> None:
    model_dir = build_model(work_dir / MODEL)
    with shared_cache_cluster(work_dir, model_dir, kv_events=True) as cluster:
        settings = Settings()
        settings.discovery.worker_urls = tuple(e.url for e in cluster.engines)
        settings.discovery.kv_event_sources = tuple(cluster.event_sources)
        settings.scrape.interval_s = 0.2
        settings.routing.tokenizer = model_dir
        settings.shared_tier.mode = "on"
        settings.shared_tier.feed = args.feed
        app = create_app(settings, discovery=StaticDiscovery(settings.discovery.worker_urls), encoder=PromptTokenizer.from_model_dir(model_dir))
        async with serving(app, settings.server) as url, aiohttp.ClientSession() as session:
            gw = app[GATEWAY]
            while not (len(gw.pods.healthy()) == 2 and all(p.stats.num_gpu_blocks for p in gw.pods)):
                await asyncio.sleep(0.1)
            ledger = Ledger(gw, cluster, args.verbose)
            # Bursts first, while the GPUs have room: a second pod then takes part of a burst.
            for burst in range(args.bursts):
                prefix = tokens(500 + burst, 2500)
                requests = [complete(session, url, prefix + tokens(600 + 10 * burst + i, 40)) for i in range(4)]
                await ledger.step("burst", asyncio.gather(*requests), requests=4)
            prompts = [tokens(100 + i, 2500) for i in range(args.prompts)]
            cold = [await ledger.step("cold", complete(session, url, p), p) for p in prompts]
            order = prompts[1::2] + prompts[0::2]
            back = [await ledger.step("return", complete(session, url, p), p) for p in order]
            chats = [tokens(700 + i, 600) for i in range(args.chats)]
            for turn in range(args.turns):
                for i, history in enumerate(chats):
                    history += tokens(800 + 100 * i + turn, 300)
                    await ledger.step("chat", complete(session, url, history), list(history))
            ledger.report()
            cold_s = statistics.median(s for [s] in cold)
            back_s = statistics.median(s for [s] in back)
            print(f"\nprefill of a 2,500-token prompt: cold median {cold_s:.3f} s, returning median {back_s:.3f} s")
            print(f"learned load ratio {gw.load_cost.ratio:.3f} from {gw.load_cost.observations} windows")
            print(f"direct ratio (returning / cold prefill, whole requests): {back_s / cold_s:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="distinct long prompts (default 8: 160 blocks, both GPUs hold 128)")
    parser.add_argument("--bursts", type=int, default=3, help="bursts of four requests on a new prefix (default 3)")
    parser.add_argument("--chats", type=int, default=3, help="chats (default 3)")
    parser.add_argument("--turns", type=int, default=4, help="turns per chat (default 4)")
    parser.add_argument("--verbose", action="store_true", help="one line per step: where it went, what was loaded")
    parser.add_argument("--feed", default="events", choices=sorted(FEED_MASKS), help="the feed the gateway prices with")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
