"""Two real vLLM CPU engines sharing L2 (cache nodes) and L3 (Redis) through the connector.

A long prompt computed by engine A is loaded, not recomputed, by engine B:
from L2 while the nodes run, from L3 once they are gone, from B's own L1 after
its prefix cache is reset. Every answer equals A's greedy answer. Blocks that
fail their check, and every shared tier stopped, make B recompute, and it
still answers the same.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kvcache_cluster import (
    SharedCacheCluster,
    complete,
    metric,
    reset_prefix_cache,
    shared_cache_cluster,
    wait_for,
)

BLOCK = 128
PROMPT_TOKENS = 3000
#: Blocks the connector may load: full blocks, never the one holding the last token.
LOADABLE = (PROMPT_TOKENS - 1) // BLOCK
HITS = "vllm:external_prefix_cache_hits_total"
BY_SOURCE = "vllm:prompt_tokens_cached_by_source_total"


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 1000) for _ in range(PROMPT_TOKENS)]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCacheCluster]:
    with shared_cache_cluster(tmp_path_factory.mktemp("kvcache-e2e"), tiny_model_dir) as running:
        yield running


def test_engine_b_loads_from_l2_what_engine_a_computed(cluster: SharedCacheCluster) -> None:
    a, b = cluster.engines
    tokens = prompt(1)
    expected, _ = complete(a.url, tokens)
    wait_for(lambda: asyncio.run(cluster.l2_blocks()) >= LOADABLE and cluster.l3_blocks() >= LOADABLE)

    hits, p2p = metric(b.url, HITS), metric(b.url, BY_SOURCE, source="p2p")
    answer, _ = complete(b.url, tokens)
    assert answer == expected
    assert metric(b.url, HITS) - hits == LOADABLE * BLOCK
    assert metric(b.url, BY_SOURCE, source="p2p") - p2p == LOADABLE * BLOCK
    assert metric(b.url, "kvgate_kvcache_hits_total", tier="l2", process="worker0") >= LOADABLE


def test_engine_b_loads_from_l3_once_l2_is_gone(cluster: SharedCacheCluster) -> None:
    a, b = cluster.engines
    tokens = prompt(2)
    already = cluster.l3_blocks()
    expected, _ = complete(a.url, tokens)
    wait_for(lambda: cluster.l3_blocks() >= already + LOADABLE)
    cluster.stop_l2()

    hits, disk = metric(b.url, HITS), metric(b.url, BY_SOURCE, source="disk")
    answer, _ = complete(b.url, tokens)
    assert answer == expected
    assert metric(b.url, HITS) - hits == LOADABLE * BLOCK
    assert metric(b.url, BY_SOURCE, source="disk") - disk == LOADABLE * BLOCK


def test_blocks_failing_their_check_are_recomputed_not_loaded(cluster: SharedCacheCluster) -> None:
    a, b = cluster.engines
    cluster.stop_l2()
    tokens = prompt(4)
    already = cluster.l3_blocks()
    expected, _ = complete(a.url, tokens)
    wait_for(lambda: cluster.l3_blocks() >= already + LOADABLE)
    with cluster.redis.client() as client:  # flip one payload byte of every stored block
        for name in client.scan_iter(match=b"kvgate:kv:*", count=1000):
            frame = bytearray(client.get(name))
            frame[-100] ^= 0xFF
            client.set(name, bytes(frame))

    failures = metric(b.url, "kvgate_kvcache_checksum_failures_total", tier="l3", process="worker0")
    answer, _ = complete(b.url, tokens)
    assert answer == expected, "damaged blocks are never used: B recomputes and answers the same"
    assert metric(b.url, "kvgate_kvcache_checksum_failures_total", tier="l3", process="worker0") - failures >= 1


def test_with_every_shared_tier_stopped_engine_b_still_answers(cluster: SharedCacheCluster) -> None:
    a, b = cluster.engines
    cluster.stop_l2()
    cluster.stop_l3()

    tokens = prompt(3)
    expected, _ = complete(a.url, tokens)
    hits = metric(b.url, HITS)
    answer, _ = complete(b.url, tokens)
    assert answer == expected, "recomputed on B, the same greedy answer"
    assert metric(b.url, HITS) == hits, "nothing to load: no shared tier is up"
    assert metric(b.url, "kvgate_kvcache_tier_up", tier="l3", process="scheduler") == 0
    assert metric(b.url, "kvgate_kvcache_tier_failures_total", tier="l2", process="scheduler") > 0

    # What B loaded earlier sits in its own L1: after its prefix cache is
    # emptied, it still loads it (host hits) with every shared tier down.
    reset_prefix_cache(b.url)
    again, host = metric(b.url, HITS), metric(b.url, BY_SOURCE, source="host")
    first, _ = complete(a.url, prompt(1))
    answer, _ = complete(b.url, prompt(1))
    assert answer == first
    assert metric(b.url, BY_SOURCE, source="host") - host == LOADABLE * BLOCK
    assert metric(b.url, HITS) - again == LOADABLE * BLOCK
