"""kv-aware with a shared KV cache: GPU-resident tokens cost nothing, shared ones their load, the rest a prefill.

Pods are priced through `PolicyBook` as the gateway does, on tables of pod
states: the prompt's blocks resident on the pod's GPU, only in the shared
cache (L2), or nowhere; idle or busy.
"""

from __future__ import annotations

import random

import pytest

from kvcache.keys import chain_hashes
from router.fairness import VirtualTokenCounters
from router.pods import EngineStats, Pod, PodId, UserId
from router.policies import PolicyBook, PolicyDeps, RouteRequest
from router.settings import RoutingSettings
from router.shared_tier import SharedCacheUse, SharedTier, TierMatch

BLOCK = 16
PROMPT = 20 * BLOCK + 1  # 20 full blocks and one token: all 20 are loadable
TOKENS = list(range(100, 100 + PROMPT))
HASHES = tuple(chain_hashes(TOKENS, BLOCK))
D = RoutingSettings().prefill_tokens_per_decode


def pod(name: str, *, pending: int = 0, in_flight: int = 0, queries: float = 1.0, external: float = 1.0) -> Pod:
    return Pod(
        id=PodId(name),
        url=f"http://{name}",
        pending_prefill=pending,
        in_flight=in_flight,
        stats=EngineStats(prefix_queries=queries, external_queries=external),
    )


def uses_connector(p: Pod) -> bool:
    return p.stats.external_queries > 0


def request(
    *, gpu: dict[Pod, int] | None = None, shared_blocks: int = 0, ratio: float = 0.1, tiers: bool = True
) -> RouteRequest:
    tier = SharedTier()
    tier.confirm(HASHES[:shared_blocks])
    match = tier.match(HASHES, PROMPT, BLOCK, ratio, uses_connector) if tiers else None
    return RouteRequest(
        user=UserId("u"),
        model="tiny",
        prompt_tokens=PROMPT,
        block_size=BLOCK,
        block_hashes=HASHES,
        matched_blocks={p.id: n for p, n in (gpu or {}).items()},
        tiers=match,
    )


def costs(req: RouteRequest, pods: list[Pod]) -> list[float]:
    book = PolicyBook(PolicyDeps(RoutingSettings(), VirtualTokenCounters(), random.Random(0)))
    return book.get("kv-aware").costs(req, pods)


@pytest.mark.parametrize(
    ("gpu_blocks", "shared_blocks", "ratio", "connector", "expected"),
    [
        pytest.param(20, 20, 0.1, True, 1.0, id="gpu-resident-costs-the-last-token"),
        pytest.param(0, 20, 0.1, True, 1 + 20 * BLOCK * 0.1, id="l2-only-costs-its-load"),
        pytest.param(0, 20, 0.5, True, 1 + 20 * BLOCK * 0.5, id="l2-only-at-the-learned-ratio"),
        pytest.param(0, 0, 0.1, True, PROMPT, id="nowhere-costs-a-prefill"),
        pytest.param(8, 20, 0.1, True, 1 + 12 * BLOCK * 0.1, id="gpu-head-then-l2-tail"),
        pytest.param(0, 8, 0.1, True, 8 * BLOCK * 0.1 + (PROMPT - 8 * BLOCK), id="l2-head-then-prefill"),
        pytest.param(12, 8, 0.1, True, PROMPT - 12 * BLOCK, id="l2-run-shorter-than-the-gpu-hit-adds-nothing"),
        pytest.param(0, 20, 0.1, False, PROMPT, id="pod-without-connector-cannot-load"),
    ],
)
def test_the_miss_costs_its_load_where_the_shared_cache_holds_it(gpu_blocks, shared_blocks, ratio, connector, expected):
    p = pod("a", external=1.0 if connector else 0.0)

    [cost] = costs(request(gpu={p: gpu_blocks}, shared_blocks=shared_blocks, ratio=ratio), [p])

    assert cost == pytest.approx(expected)


def test_the_block_holding_the_last_token_is_never_loaded():
    p = pod("a")
    tokens = TOKENS[: 20 * BLOCK]  # exactly 20 blocks: the 20th holds the last token
    hashes = tuple(chain_hashes(tokens, BLOCK))
    tier = SharedTier()
    tier.confirm(hashes)
    req = RouteRequest(
        user=UserId("u"), model="tiny", prompt_tokens=len(tokens), block_size=BLOCK, block_hashes=hashes,
        tiers=tier.match(hashes, len(tokens), BLOCK, 0.1, uses_connector),
    )  # fmt: skip

    [cost] = costs(req, [p])

    assert cost == pytest.approx(19 * BLOCK * 0.1 + BLOCK)


@pytest.mark.parametrize(
    ("holder_pending", "ratio", "expected"),
    [
        # Loading 320 tokens costs 32 at ratio 0.1, and the second copy as much again: a holder
        # with more than 64 queued loses (its own last token counts twice there, once for the
        # request it holds up).
        pytest.param(0, 0.1, "holder", id="idle-holder-wins"),
        pytest.param(60, 0.1, "holder", id="holder-queue-under-the-load-cost"),
        pytest.param(70, 0.1, "loader", id="busy-holder-loses-to-idle-loader"),
        pytest.param(200, 0.1, "loader", id="queue-far-below-a-prefill-still-loses"),
        pytest.param(200, 0.9, "holder", id="loading-dearer-than-waiting-keeps-the-holder"),
    ],
)
def test_a_busy_pod_with_the_prefix_loses_to_an_idle_pod_that_loads_it_when_loading_is_cheaper_than_waiting(
    holder_pending, ratio, expected
):
    holder, loader = pod("holder", pending=holder_pending, in_flight=1 if holder_pending else 0), pod("loader")
    req = request(gpu={holder: 20}, shared_blocks=20, ratio=ratio)

    cost = costs(req, [holder, loader])

    assert cost[0] != cost[1]
    assert [holder, loader][cost.index(min(cost))] is (holder if expected == "holder" else loader)


def test_without_the_shared_cache_the_busy_holder_keeps_the_prefix():
    holder, other = pod("holder", pending=200, in_flight=1), pod("other")

    cost = costs(request(gpu={holder: 20}, tiers=False), [holder, other])

    assert cost[0] < cost[1], "recomputing 321 tokens costs more than a 200-token queue"


def test_a_chat_whose_history_left_every_gpu_goes_to_the_least_loaded_pod():
    pods = [pod("a", pending=50, in_flight=1), pod("b", pending=10, in_flight=1), pod("c", pending=30, in_flight=1)]

    cost = costs(request(shared_blocks=20), pods)

    assert cost.index(min(cost)) == 1
    assert cost[0] - cost[1] == pytest.approx(40)


def test_a_pod_not_yet_queried_counts_as_loading_once_the_fleet_is_detected():
    use = SharedCacheUse("auto")
    fresh = pod("fresh", queries=0.0, external=0.0)
    plain = pod("plain", queries=10.0, external=0.0)
    assert not use(fresh)
    use.scraped(PodId("other"), EngineStats(prefix_queries=5.0, external_queries=5.0))
    assert use.active and use(fresh) and not use(plain)
    assert use.without(plain) and not use.without(fresh)


def test_the_work_of_a_request_on_a_pod_counts_loads_at_their_ratio():
    p = pod("a")
    req = request(shared_blocks=20, ratio=0.25)

    assert req.prefill_work(p, 0) == pytest.approx(1 + 20 * BLOCK * 0.25)
    assert req.prefill_work(p, 20) == pytest.approx(1)
    assert isinstance(req.tiers, TierMatch)


@pytest.mark.parametrize(
    ("shared_blocks", "connector", "copied_work"),
    [
        pytest.param(20, True, 12 * BLOCK * 0.1, id="a-copy-loaded-from-l2-costs-its-load"),
        pytest.param(4, True, 4 * BLOCK * 0.1 + 8 * BLOCK, id="loaded-head-computed-rest"),
        pytest.param(20, False, 12 * BLOCK, id="a-pod-without-connector-computes-the-copy"),
        pytest.param(0, True, 12 * BLOCK, id="nothing-in-l2-computes-the-copy"),
    ],
)
def test_a_second_copy_of_a_held_prefix_is_priced_at_what_making_it_costs(shared_blocks, connector, copied_work):
    """Another pod's GPU holds 12 blocks; copying them is priced k x their work on this pod (load or compute)."""
    holder, other = pod("holder"), pod("other", external=1.0 if connector else 0.0)
    req = request(gpu={holder: 12}, shared_blocks=shared_blocks)
    book = PolicyBook(PolicyDeps(RoutingSettings(prefix_copy_weight=2.0), VirtualTokenCounters(), random.Random(0)))

    [with_copy] = book.get("kv-aware").costs(req, [other])
    free = PolicyBook(PolicyDeps(RoutingSettings(prefix_copy_weight=0.0), VirtualTokenCounters(), random.Random(0)))
    [without] = free.get("kv-aware").costs(req, [other])

    assert with_copy - without == pytest.approx(2.0 * copied_work)
