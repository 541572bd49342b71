"""Routing policies: a contract every registered policy keeps, then each policy's choices.

Policies are built the way the gateway builds them (`PolicyBook`) and priced on
constructed pods; "chooses" means the strict argmin of the returned costs.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from kvcache.keys import chain_hashes
from router.errors import InvalidRequest
from router.fairness import VirtualTokenCounters
from router.fleet_order import IndexOccupancy
from router.index import PrefixIndex
from router.policies import REGISTRY, PolicyBook, PolicyDeps, RouteRequest, normalise, parse_spec
from router.policies.session_affinity import rendezvous_weight
from router.pods import EngineStats, Pod, PodId, PodSet, UserId
from router.settings import RoutingSettings

BLOCK = 16
MIX = "prefix-cache:2,least-request:1"


def make_pod(
    name: str,
    *,
    in_flight: int = 0,
    pending_prefill: int = 0,
    decoding: int = 0,
    running: int = 0,
    waiting: int = 0,
    kv_usage: float = 0.0,
    num_gpu_blocks: int | None = None,
    scraped_in_flight: int | None = None,
) -> Pod:
    """A pod; its engine figures were read when the gateway had `scraped_in_flight` requests on it (default: as now)."""
    stats = EngineStats(running=running, waiting=waiting, kv_usage=kv_usage, num_gpu_blocks=num_gpu_blocks)
    stats.gateway_in_flight = in_flight if scraped_in_flight is None else scraped_in_flight
    return Pod(
        id=PodId(f"http://{name}:8000"),
        url=f"http://{name}:8000",
        in_flight=in_flight,
        pending_prefill=pending_prefill,
        decoding=decoding,
        stats=stats,
    )


def make_request(
    *,
    prompt_tokens: int = 10 * BLOCK,
    matched: dict[Pod, int] | None = None,
    user: str = "alice",
    session_key: str | None = None,
) -> RouteRequest:
    return RouteRequest(
        user=UserId(user),
        model="tiny",
        prompt_tokens=prompt_tokens,
        block_size=BLOCK,
        matched_blocks={pod.id: n for pod, n in (matched or {}).items()},
        session_key=session_key,
    )


def make_book(counters: VirtualTokenCounters | None = None, **routing) -> PolicyBook:
    return PolicyBook(PolicyDeps(RoutingSettings(**routing), counters or VirtualTokenCounters(), random.Random(0)))


def cheapest(costs: list[float]) -> int:
    """Index of the unique lowest cost; fails on a tie, so a choice is never an accident of order."""
    best = min(costs)
    winners = [i for i, c in enumerate(costs) if c == best]
    assert len(winners) == 1, f"tie between {winners} in {costs}"
    return winners[0]


def snapshot(pods: list[Pod]) -> list[dict]:
    return [dataclasses.asdict(pod) for pod in pods]


# -- contract: every registered policy, and a weighted mix ------------------------------------

ALL_SPECS = [pytest.param(name, id=name) for name in sorted(REGISTRY)] + [pytest.param(MIX, id="mix")]


def fleet() -> tuple[list[Pod], RouteRequest]:
    """A varied fleet: idle, busy, holding the prefix, engine-reported load, full KV."""
    pods = [
        make_pod("a"),
        make_pod("b", in_flight=3, pending_prefill=300, decoding=1, kv_usage=0.4),
        make_pod("c", in_flight=1, running=5, waiting=2, kv_usage=0.9, num_gpu_blocks=64),
        make_pod("d", in_flight=7, pending_prefill=50, decoding=6, kv_usage=1.0),
    ]
    request = make_request(matched={pods[1]: 4, pods[2]: 10, pods[3]: 12}, session_key="s-1")
    return pods, request


def test_registry_names_match_the_policies():
    assert set(REGISTRY) == {
        "random",
        "round-robin",
        "least-request",
        "least-kv-cache",
        "session-affinity",
        "prefix-cache",
        "vtc-basic",
        "kv-aware",
    }
    for name, cls in REGISTRY.items():
        assert cls.name == name


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_policy_returns_one_finite_cost_per_pod(spec):
    pods, request = fleet()
    policy = make_book().get(spec)

    for _ in range(3):  # stateful policies (round-robin) must keep the contract on later calls
        costs = policy.costs(request, pods)
        assert len(costs) == len(pods)
        assert all(isinstance(c, float) and math.isfinite(c) for c in costs), costs


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_policy_does_not_mutate_pods(spec):
    pods, request = fleet()
    before = snapshot(pods)

    make_book().get(spec).costs(request, pods)

    assert snapshot(pods) == before


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize(
    "matched", [pytest.param(0, id="no-match"), pytest.param(10, id="full-match")]
)
def test_policy_handles_a_single_pod(spec, matched):
    pod = make_pod("solo", in_flight=2, running=2, kv_usage=0.5)
    request = make_request(matched={pod: matched} if matched else None, session_key="s-1")

    costs = make_book().get(spec).costs(request, [pod])

    assert len(costs) == 1
    assert math.isfinite(costs[0])


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_policy_handles_no_pods(spec):
    assert make_book().get(spec).costs(make_request(), []) == []


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_book_returns_the_same_policy_for_the_same_spec(spec):
    book = make_book()

    assert book.get(spec) is book.get(spec)


# -- least-request ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        pytest.param([make_pod("a", in_flight=3), make_pod("b", in_flight=1), make_pod("c", in_flight=2)], 1, id="fewest-in-flight"),
        pytest.param([make_pod("a", running=5, waiting=2), make_pod("b", in_flight=2)], 1, id="engine-load-when-higher"),
        pytest.param([make_pod("a", in_flight=4, running=1), make_pod("b", in_flight=3, running=3)], 1, id="gateway-count-when-higher"),
        # Engine figures read while the gateway had 4 requests there, all since finished: the pod is empty.
        pytest.param([make_pod("a", running=4, scraped_in_flight=4), make_pod("b", in_flight=1, running=1)], 0, id="stale-engine-count"),
        # Read while the gateway had 1 there: 2 are others', and they still count.
        pytest.param([make_pod("a", running=3, scraped_in_flight=1), make_pod("b", in_flight=1, running=1)], 1, id="others-count"),
    ],
)
def test_least_request_picks_the_least_loaded(pods, expected):
    costs = make_book().get("least-request").costs(make_request(), pods)

    assert cheapest(costs) == expected


def test_least_request_ignores_cached_prefixes():
    holder, idle = make_pod("a", in_flight=1), make_pod("b")
    costs = make_book().get("least-request").costs(make_request(matched={holder: 10}), [holder, idle])

    assert cheapest(costs) == 1


# -- least-kv-cache ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        pytest.param([make_pod("a", kv_usage=0.7), make_pod("b", kv_usage=0.2), make_pod("c", kv_usage=0.5)], 1, id="lowest-usage"),
        pytest.param(
            [make_pod("a", kv_usage=0.3, pending_prefill=512, num_gpu_blocks=64), make_pod("b", kv_usage=0.6, num_gpu_blocks=64)],
            1,
            id="unscraped-prefill-counts",
        ),
    ],
)
def test_least_kv_cache_picks_the_lowest_usage(pods, expected):
    costs = make_book().get("least-kv-cache").costs(make_request(), pods)

    assert cheapest(costs) == expected


def test_least_kv_cache_adds_pending_prefill_as_a_fraction_of_capacity():
    reported = make_pod("a", kv_usage=0.25, pending_prefill=256, num_gpu_blocks=64)  # 1024 tokens of KV
    assumed = make_pod("b", kv_usage=0.25, pending_prefill=256)  # default capacity

    costs = make_book(default_capacity_blocks=128).get("least-kv-cache").costs(make_request(), [reported, assumed])

    assert costs == pytest.approx([0.25 + 256 / (64 * BLOCK), 0.25 + 256 / (128 * BLOCK)], abs=1e-12)


# -- round-robin ------------------------------------------------------------------------------


def test_round_robin_cycles_through_pods_in_id_order():
    a, b, c = make_pod("a", in_flight=9), make_pod("b"), make_pod("c")
    policy = make_book().get("round-robin")

    chosen = [[c, a, b][cheapest(policy.costs(make_request(), [c, a, b]))].id for _ in range(6)]

    assert chosen == [a.id, b.id, c.id, a.id, b.id, c.id]


# -- session-affinity -------------------------------------------------------------------------


def affinity_choice(policy, key: str, pods: list[Pod]) -> PodId:
    return pods[cheapest(policy.costs(make_request(session_key=key), pods))].id


def test_session_affinity_is_sticky_whatever_the_load():
    pods = [make_pod(name) for name in "abcd"]
    policy = make_book().get("session-affinity")
    first = affinity_choice(policy, "session-42", pods)

    for busy in range(4):
        pods[busy].in_flight = 50
        assert affinity_choice(policy, "session-42", pods) == first
        assert affinity_choice(policy, "session-42", list(reversed(pods))) == first


def test_session_affinity_without_a_key_prices_every_pod_the_same():
    pods = [make_pod(name) for name in "abc"]

    costs = make_book().get("session-affinity").costs(make_request(session_key=None), pods)

    assert costs == [0.0, 0.0, 0.0]


def test_removing_a_pod_moves_only_its_own_sessions():
    pods = [make_pod(name) for name in "abcde"]
    policy = make_book().get("session-affinity")
    keys = [f"session-{i}" for i in range(400)]
    before = {key: affinity_choice(policy, key, pods) for key in keys}
    gone = pods[2]

    after = {key: affinity_choice(policy, key, [p for p in pods if p is not gone]) for key in keys}

    moved = {key for key in keys if before[key] != after[key]}
    assert moved == {key for key in keys if before[key] == gone.id}
    assert len(moved) > 0


def test_adding_a_pod_moves_sessions_only_onto_it():
    pods = [make_pod(name) for name in "abcd"]
    policy = make_book().get("session-affinity")
    keys = [f"session-{i}" for i in range(400)]
    before = {key: affinity_choice(policy, key, pods) for key in keys}
    new = make_pod("e")

    after = {key: affinity_choice(policy, key, [*pods, new]) for key in keys}

    moved = [key for key in keys if before[key] != after[key]]
    assert all(after[key] == new.id for key in moved)
    # About a fifth of the sessions move; 80 +- 40 is far wider than chance explains.
    assert 40 <= len(moved) <= 120


def test_session_affinity_spreads_keys_evenly():
    pods = [make_pod(name) for name in "abcd"]
    policy = make_book().get("session-affinity")
    counts = dict.fromkeys((p.id for p in pods), 0)

    for i in range(2000):
        counts[affinity_choice(policy, f"user-{i}/conv-{i * 7}", pods)] += 1

    # 500 expected per pod; the binomial sd is ~19, so +-15% (75) is ~4 sd.
    assert all(abs(n - 500) <= 75 for n in counts.values()), counts


def test_rendezvous_weight_is_deterministic_and_key_dependent():
    assert rendezvous_weight("k", "http://a:8000") == rendezvous_weight("k", "http://a:8000")
    assert rendezvous_weight("k", "http://a:8000") != rendezvous_weight("k2", "http://a:8000")
    assert rendezvous_weight("k", "http://a:8000") != rendezvous_weight("k", "http://b:8000")


# -- prefix-cache -----------------------------------------------------------------------------


def prefix_choice(pods: list[Pod], matched: dict[int, int], **routing) -> int:
    request = make_request(matched={pods[i]: n for i, n in matched.items()})
    return cheapest(make_book(**routing).get("prefix-cache").costs(request, pods))


@pytest.mark.parametrize(
    ("loads", "matched", "expected"),
    [
        pytest.param([0, 0, 0], {0: 1, 1: 3}, 1, id="longest-match"),
        pytest.param([1, 0, 1, 0], {0: 2, 3: 2}, 3, id="equal-match-to-less-loaded"),
        pytest.param([1, 0, 1, 0], {0: 3, 3: 2}, 0, id="longer-match-beats-lower-load"),
        pytest.param([2, 0, 1], {}, 1, id="no-match-least-loaded"),
        pytest.param([3, 0, 0, 0], {0: 4, 1: 1}, 1, id="overloaded-holder-skipped-for-next-match"),
        pytest.param([3, 0, 1, 1], {0: 4}, 1, id="overloaded-holder-skipped-for-least-loaded"),
        pytest.param([2, 1, 2, 1], {0: 4, 1: 1}, 0, id="busiest-holder-at-mean-plus-std-kept"),
    ],
)
def test_prefix_cache_prefers_the_longest_match(loads, matched, expected):
    # Loads differ by at most imbalance_abs (8) throughout; "overloaded" is load > mean + pstdev.
    pods = [make_pod(f"p{i}", in_flight=n) for i, n in enumerate(loads)]

    assert prefix_choice(pods, matched) == expected


@pytest.mark.parametrize(
    ("holder_load", "expected"),
    [
        pytest.param(8, 0, id="imbalance-at-limit-holder-wins"),
        pytest.param(9, 1, id="imbalance-over-limit-least-loaded"),
    ],
)
def test_prefix_cache_falls_back_to_least_loaded_beyond_imbalance_abs(holder_load, expected):
    # With two pods mean + std equals the busier load, so only the imbalance rule can move the request.
    pods = [make_pod("holder", in_flight=holder_load), make_pod("idle")]

    assert prefix_choice(pods, {0: 10}, imbalance_abs=8) == expected


def test_prefix_cache_imbalance_uses_the_setting():
    pods = [make_pod("holder", in_flight=3), make_pod("idle")]

    assert prefix_choice(pods, {0: 10}, imbalance_abs=8) == 0
    assert prefix_choice(pods, {0: 10}, imbalance_abs=2) == 1


# -- vtc-basic --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("consumed", "running", "expected_index"),
    [
        pytest.param(0, [0, 0, 0], 0, id="fresh-user-to-first-pod"),
        pytest.param(250, [0, 0, 0], 2, id="counter-picks-pod-2.5"),
        pytest.param(130, [0, 0, 0], 1, id="counter-picks-pod-1.3"),
        pytest.param(700, [0, 0, 0], 1, id="counter-wraps-mod-n-times-100"),
        pytest.param(250, [0, 50, 150], 2, id="running-capped-at-100"),
        pytest.param(120, [0, 100, 0], 2, id="busy-pod-outweighs-fairness"),
    ],
)
def test_vtc_basic_matches_the_aibrix_formula(consumed, running, expected_index):
    # Every expected choice wins by more than the 0.1 jitter.
    counters = VirtualTokenCounters()
    counters.charge(UserId("alice"), input_tokens=consumed)
    named = [make_pod(name, running=r) for name, r in zip("abc", running)]
    pods = [named[2], named[0], named[1]]  # the index is by pod id, not by list position
    policy = make_book(counters).get("vtc-basic")
    normalised = (consumed % (3 * 100)) / 100

    costs = policy.costs(make_request(user="alice"), pods)

    for pod, cost in zip(pods, costs):
        index = named.index(pod)
        formula = 0.5 * abs(index - normalised) + 0.5 * min(pod.load / 100, 1.0)
        assert 0.0 <= cost - formula < 0.1, (pod.id, cost, formula)
    assert named.index(pods[cheapest(costs)]) == expected_index


@pytest.mark.parametrize(
    ("pod_kwargs", "expected_load"),
    [
        pytest.param({"in_flight": 60, "scraped_in_flight": 0}, 60, id="sent-since-the-scrape"),
        pytest.param({"running": 60, "scraped_in_flight": 60}, 0, id="finished-since-the-scrape"),
        pytest.param({"running": 80, "in_flight": 20, "scraped_in_flight": 20}, 80, id="others-and-the-gateway-s"),
    ],
)
def test_vtc_basic_reads_the_pod_s_load_now_not_the_engine_s_last_count(pod_kwargs, expected_load):
    """The utilization term is AIBrix's, over the requests on the pod now (`Pod.load`)."""
    pod = make_pod("a", **pod_kwargs)

    [cost] = make_book().get("vtc-basic").costs(make_request(), [pod])

    assert 0.0 <= cost - 0.5 * expected_load / 100 < 0.1


def test_vtc_basic_jitter_varies_between_calls():
    pods = [make_pod(name) for name in "abc"]
    policy = make_book().get("vtc-basic")

    samples = {policy.costs(make_request(), pods)[0] for _ in range(20)}

    assert len(samples) > 10
    assert all(0.0 <= s < 0.1 for s in samples)  # pod a, index 0, fresh user: formula part is 0


# -- kv-aware ---------------------------------------------------------------------------------

PROMPT = 10 * BLOCK  # 160 tokens
D = RoutingSettings().prefill_tokens_per_decode


@pytest.mark.parametrize(
    ("pod_kwargs", "matched", "expected"),
    [
        pytest.param({}, 0, PROMPT, id="idle-no-match-costs-the-prompt"),
        pytest.param({}, 10, 0.0, id="idle-full-match-costs-nothing"),
        pytest.param({}, 4, PROMPT - 4 * BLOCK, id="partial-match"),
        pytest.param({}, 12, 0.0, id="match-beyond-prompt-clamped"),
        # The request's work also holds up every request on the pod: x (1 + requests there).
        pytest.param({"pending_prefill": 100, "in_flight": 1}, 0, 2 * PROMPT + 100, id="pending-prefill-adds"),
        pytest.param({"decoding": 2, "in_flight": 2}, 0, 3 * PROMPT + 2 * D, id="gateway-decoding"),
        pytest.param({"running": 3, "waiting": 1}, 0, 5 * PROMPT + 4 * D, id="engine-load-when-higher"),
        pytest.param({"decoding": 5, "in_flight": 5, "running": 2}, 0, 6 * PROMPT + 5 * D, id="gateway-count-when-higher"),
        pytest.param({"decoding": 2, "in_flight": 2}, 10, 2 * D, id="no-work-holds-nobody-up"),
        # The engine's 4 were the gateway's, since finished: nobody left to hold up.
        pytest.param({"running": 4, "scraped_in_flight": 4}, 0, PROMPT, id="stale-engine-count-ignored"),
        # 3 the engine had beyond the gateway's 1 then are others': the gateway's 2 now plus those 3.
        pytest.param({"running": 4, "scraped_in_flight": 1, "in_flight": 2, "decoding": 2}, 0, 6 * PROMPT + 5 * D, id="others-added"),
        pytest.param({"decoding": 2, "in_flight": 2}, 4, 3 * (PROMPT - 4 * BLOCK) + 2 * D, id="partial-work-times-crowd"),
    ],
)
def test_kv_aware_cost_follows_its_formula(pod_kwargs, matched, expected):
    pod = make_pod("a", **pod_kwargs)

    costs = make_book().get("kv-aware").costs(make_request(prompt_tokens=PROMPT, matched={pod: matched}), [pod])

    assert costs == [pytest.approx(expected, abs=1e-9)]


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        pytest.param(0.0, PROMPT + 2 * D, id="own-wait-only"),
        pytest.param(0.5, 2 * PROMPT + 2 * D, id="half"),
    ],
)
def test_kv_aware_prefill_delay_weight_comes_from_settings(weight, expected):
    pod = make_pod("a", decoding=2, in_flight=2)

    costs = make_book(prefill_delay_weight=weight).get("kv-aware").costs(make_request(prompt_tokens=PROMPT), [pod])

    assert costs == [pytest.approx(expected)]


@pytest.mark.parametrize(
    ("other_kwargs", "expected"),
    [
        pytest.param({}, "other", id="an-idle-pod-takes-the-recompute"),
        pytest.param({"decoding": 1, "in_flight": 1}, "holder", id="not-onto-a-pod-it-would-hold-up"),
    ],
)
def test_kv_aware_recomputes_a_prefix_only_where_it_holds_few_requests_up(other_kwargs, expected):
    """The holder's queue outweighs recomputing the prefix on an idle pod, not on one already serving a stream."""
    holder = make_pod("holder", pending_prefill=2 * PROMPT + 40, in_flight=1)  # over the recompute and the copy
    other = make_pod("other", **other_kwargs)
    request = make_request(prompt_tokens=PROMPT, matched={holder: 10})

    costs = make_book().get("kv-aware").costs(request, [holder, other])

    assert [holder, other][cheapest(costs)] is (holder if expected == "holder" else other)


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        pytest.param(0.0, "other", id="queue-outweighs-the-recompute"),
        pytest.param(1.0, "holder", id="a-second-copy-priced-keeps-it"),
    ],
)
def test_kv_aware_prices_a_second_copy_of_a_held_prefix(weight, expected):
    """A holder with a long prefill queued against an idle pod: the copy weight decides whether the prefix moves."""
    holder = make_pod("holder", pending_prefill=PROMPT + PROMPT // 2, in_flight=1)
    other = make_pod("other")
    partial = make_pod("partial", in_flight=1)  # holds the first 2 blocks: charged for copying the other 8
    request = make_request(prompt_tokens=PROMPT, matched={holder: 10, partial: 2})

    costs = make_book(prefix_copy_weight=weight).get("kv-aware").costs(request, [holder, other, partial])
    free = make_book(prefix_copy_weight=0.0).get("kv-aware").costs(request, [holder, other, partial])

    assert [holder, other, partial][cheapest(costs)] is (holder if expected == "holder" else other)
    assert [c - f for c, f in zip(costs, free)] == pytest.approx([0.0, weight * 10 * BLOCK, weight * 8 * BLOCK])


@pytest.mark.parametrize(
    ("crowded_requests", "expected"),
    [
        pytest.param(1, "crowded", id="one-request-less-work-queued-wins"),
        pytest.param(4, "quiet", id="many-cheap-requests-keep-a-one-off-away"),
    ],
)
def test_kv_aware_keeps_a_new_prompt_off_a_pod_crowded_with_cheap_requests(crowded_requests, expected):
    """A pod serving many cache hits (little prefill queued) against one busy with a single long prefill."""
    crowded = make_pod("crowded", in_flight=crowded_requests, decoding=crowded_requests)
    quiet = make_pod("quiet", in_flight=1, pending_prefill=PROMPT)

    costs = make_book(prefill_tokens_per_decode=1.0).get("kv-aware").costs(make_request(prompt_tokens=PROMPT), [crowded, quiet])

    assert [crowded, quiet][cheapest(costs)] is (crowded if expected == "crowded" else quiet)


@pytest.mark.parametrize(
    ("holder_kwargs", "expected"),
    [
        pytest.param({}, "holder", id="idle-holder-wins"),
        pytest.param({"pending_prefill": 2 * PROMPT - 1, "in_flight": 1}, "holder", id="pending-just-under-recompute"),
        pytest.param({"pending_prefill": 2 * PROMPT + 1, "in_flight": 1}, "other", id="pending-over-recompute"),
        pytest.param({"decoding": 9, "in_flight": 9}, "holder", id="decode-load-under-recompute"),
        pytest.param({"decoding": 11, "in_flight": 11}, "other", id="decode-load-over-recompute"),
    ],
)
def test_kv_aware_holder_wins_until_its_queue_outweighs_recompute(holder_kwargs, expected):
    """Recomputing the whole prefix elsewhere costs its work and, by default, as much again for the second copy."""
    holder, other = make_pod("holder", **holder_kwargs), make_pod("other")
    request = make_request(prompt_tokens=PROMPT, matched={holder: 10})

    costs = make_book().get("kv-aware").costs(request, [holder, other])

    assert [holder, other][cheapest(costs)] is (holder if expected == "holder" else other)


@pytest.mark.parametrize(
    ("matched", "expected"),
    [
        pytest.param(2, PROMPT, id="below-minimum-ignored"),
        pytest.param(3, PROMPT - 3 * BLOCK, id="at-minimum-counted"),
    ],
)
def test_kv_aware_ignores_matches_shorter_than_min_match_blocks(matched, expected):
    pod = make_pod("a")

    costs = make_book(min_match_blocks=3).get("kv-aware").costs(make_request(prompt_tokens=PROMPT, matched={pod: matched}), [pod])

    assert costs == [expected]


def blocks(seed: int, n: int = 10) -> tuple:
    return tuple(chain_hashes([seed * 1000 + i for i in range(n * BLOCK)], BLOCK))


def test_kv_aware_sends_a_one_off_where_it_displaces_nothing_anyone_came_back_for():
    """Two full, equally loaded pods: one holds a prefix a second request reused, the other a one-off prompt."""
    pods = PodSet(["http://keeper:8000", "http://other:8000"])
    keeper, other = pods.get(PodId("http://keeper:8000")), pods.get(PodId("http://other:8000"))
    index = PrefixIndex(default_capacity=10)
    index.insert(keeper.id, blocks(1))
    index.insert(keeper.id, blocks(1), reused=10)  # the group's second request
    index.insert(other.id, blocks(2))  # a one-off
    policy = make_book().get("kv-aware")

    def request(hashes: tuple) -> RouteRequest:
        return RouteRequest(
            user=UserId("u"), model="tiny", prompt_tokens=PROMPT, block_size=BLOCK, block_hashes=hashes,
            matched_blocks=index.match(hashes), occupancy=IndexOccupancy(index.eviction_price, pods),
        )  # fmt: skip

    one_off = policy.costs(request(blocks(3)), [keeper, other])
    again = policy.costs(request(blocks(1)), [keeper, other])

    assert index.occupancy(keeper.id) == index.occupancy(other.id) == 1.0
    assert one_off == [pytest.approx(3 * PROMPT), pytest.approx(2 * PROMPT)]
    assert cheapest(again) == 0  # the prefix's next request still goes where it is


def test_kv_aware_decode_weight_comes_from_settings():
    pod = make_pod("a", decoding=2, in_flight=2)

    costs = make_book(prefill_tokens_per_decode=10.0).get("kv-aware").costs(make_request(prompt_tokens=PROMPT), [pod])

    assert costs == [3 * PROMPT + 20.0]


# -- weighted mixes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param("kv-aware", [("kv-aware", 1.0)], id="single-name"),
        pytest.param("prefix-cache:2,least-request:1", [("prefix-cache", 2.0), ("least-request", 1.0)], id="weighted-pair"),
        pytest.param(" prefix-cache : 2 , least-request ", [("prefix-cache", 2.0), ("least-request", 1.0)], id="spaces-and-default-weight"),
        pytest.param("random:0.25", [("random", 0.25)], id="fractional-weight"),
        pytest.param("kv-aware,", [("kv-aware", 1.0)], id="trailing-comma"),
    ],
)
def test_parse_spec_accepts_good_specs(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("fastest", "unknown routing strategy", id="unknown-name"),
        pytest.param("prefix-cache:2,nope:1", "unknown routing strategy", id="unknown-name-in-mix"),
        pytest.param("prefix-cache:heavy", "bad weight", id="weight-not-a-number"),
        pytest.param("prefix-cache:0", "must be positive", id="zero-weight"),
        pytest.param("prefix-cache:-1", "must be positive", id="negative-weight"),
        pytest.param("prefix-cache:nan", "must be positive", id="nan-weight"),
        pytest.param("prefix-cache:inf", "must be positive", id="infinite-weight"),
        pytest.param("", "empty", id="empty"),
        pytest.param(" , ,", "empty", id="only-commas"),
    ],
)
def test_parse_spec_refuses_bad_specs(spec, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        parse_spec(spec)

    assert caught.value.status == 400
    assert caught.value.param == "x-routing-strategy"


def test_book_refuses_an_unknown_policy():
    with pytest.raises(InvalidRequest, match="unknown routing strategy"):
        make_book().get("fastest")


@pytest.mark.parametrize(
    ("costs", "expected"),
    [
        pytest.param([], [], id="empty"),
        pytest.param([5.0, 5.0, 5.0], [0.0, 0.0, 0.0], id="all-equal"),
        pytest.param([1.0, 3.0, 2.0], [0.0, 1.0, 0.5], id="spread"),
        pytest.param([-10.0, 0.0, -5.0], [0.0, 1.0, 0.5], id="negative"),
        pytest.param([7.0], [0.0], id="single"),
    ],
)
def test_normalise_scales_to_unit_range(costs, expected):
    assert normalise(costs) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("spec", "expected_costs", "winner"),
    [
        pytest.param("prefix-cache:2,least-request:1", [1.0, 2.0], "holder", id="cache-weighted-higher"),
        pytest.param("prefix-cache:1,least-request:2", [2.0, 1.0], "idle", id="load-weighted-higher"),
        pytest.param("prefix-cache:1,least-request:1", [1.0, 1.0], None, id="equal-weights-tie"),
    ],
)
def test_weighted_mix_sums_weighted_normalised_costs(spec, expected_costs, winner):
    # prefix-cache prefers the holder, least-request the idle pod; each normalises to 0 for its
    # favourite and 1 for the other, so the weights alone decide.
    holder, idle = make_pod("holder", in_flight=2), make_pod("idle")
    request = make_request(matched={holder: 4})

    costs = make_book().get(spec).costs(request, [holder, idle])

    assert costs == pytest.approx(expected_costs, abs=1e-12)
    if winner is not None:
        assert [holder, idle][cheapest(costs)] is (holder if winner == "holder" else idle)


def test_book_keeps_policy_state_between_requests():
    pods = [make_pod(name) for name in "abc"]
    book = make_book()

    chosen = [cheapest(book.get("round-robin").costs(make_request(), pods)) for _ in range(3)]

    assert chosen == [0, 1, 2]


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_kv_aware_queued_prefill_weight_scales_only_the_queue(weight):
    """A holder with prefill queued on it: the queue counts `weight` times; nothing else in the cost moves with it."""
    holder = make_pod("holder", pending_prefill=3 * PROMPT, in_flight=1)
    request = make_request(prompt_tokens=PROMPT, matched={holder: 10})

    costs = make_book(queued_prefill_weight=weight).get("kv-aware").costs(request, [holder])
    empty = make_book(queued_prefill_weight=weight).get("kv-aware").costs(request, [make_pod("holder", in_flight=1)])

    assert costs[0] - empty[0] == pytest.approx(weight * 3 * PROMPT)
