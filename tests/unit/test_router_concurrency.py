"""Adaptive concurrency limits: the controller's table of readings, the per-pod bookkeeping, the router's wake-ups."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from router.concurrency import ConcurrencyLimits, PodLimit, Reading, Step
from router.fairness import VirtualTokenCounters
from router.index import PrefixIndex
from router.metrics import GatewayMetrics
from router.pods import PodId, PodSet, UserId
from router.policies import PolicyBook, PolicyDeps
from router.policies.base import RouteRequest
from router.routing import Router
from router.settings import AdmissionSettings, RoutingSettings

SETTINGS = AdmissionSettings(max_inflight_per_pod=64, min_inflight_per_pod=1, ttft_tolerance=3.0, ttft_floor_drift=0.0)


def reading(waiting=0, running=4, kv=0.5, ttft=0.1, peak=None, limit=10) -> Reading:
    return Reading(waiting=waiting, running=running, kv_usage=kv, ttft_per_token_s=ttft, peak_in_flight=limit if peak is None else peak)


@pytest.mark.parametrize(
    ("limit", "floor", "seen", "expected", "step"),
    [
        pytest.param(10, 0.1, reading(peak=10), 11, Step.GROW, id="reached-and-keeping-up-grows-by-one"),
        pytest.param(10, 0.1, reading(peak=6), 10, Step.HOLD, id="not-reached-holds"),
        pytest.param(64, 0.1, reading(peak=64), 64, Step.HOLD, id="at-the-cap-holds"),
        pytest.param(10, 0.1, reading(peak=0, running=0, waiting=0), 64, Step.RESET, id="idle-goes-back-to-the-cap"),
        pytest.param(64, 0.1, reading(waiting=5, running=8, peak=13), 8, Step.SHRINK, id="engine-waiting-cuts-to-what-it-runs"),
        pytest.param(10, 0.1, reading(waiting=1, running=10), 9, Step.SHRINK, id="engine-waiting-cuts-by-the-backoff-at-least"),
        pytest.param(1, 0.1, reading(waiting=3, running=1, limit=1), 1, Step.HOLD, id="never-below-the-least"),
        pytest.param(8, 0.1, reading(waiting=5, running=8, peak=20), 8, Step.HOLD, id="no-second-cut-while-draining"),
        pytest.param(8, 0.1, reading(ttft=1.0, peak=9), 8, Step.HOLD, id="no-ttft-cut-while-draining"),
        pytest.param(20, 0.1, reading(kv=0.97, peak=20), 18, Step.SHRINK, id="kv-nearly-full-cuts"),
        pytest.param(20, 0.1, reading(ttft=0.4, peak=20), 15, Step.SHRINK, id="ttft-past-tolerance-cuts-by-the-ratio"),
        pytest.param(20, 0.1, reading(ttft=5.0, peak=20), 10, Step.SHRINK, id="ttft-cut-halves-at-most"),
        pytest.param(20, 0.1, reading(ttft=0.29, peak=20), 21, Step.GROW, id="ttft-within-tolerance-grows"),
        pytest.param(20, None, reading(ttft=5.0, peak=20), 21, Step.GROW, id="first-ttft-sets-the-floor"),
        pytest.param(20, 0.1, reading(ttft=None, peak=20), 21, Step.GROW, id="no-first-token-in-the-interval"),
    ],
)
def test_one_evaluation(limit, floor, seen, expected, step):
    state = PodLimit(SETTINGS, limit=limit, ttft_floor_s=floor)
    decision = state.update(seen)
    assert (decision.limit, decision.step) == (expected, step), decision.why
    assert state.limit == expected


def test_the_ttft_floor_is_the_lowest_seen_and_drifts_up():
    state = PodLimit(replace(SETTINGS, ttft_floor_drift=0.5), limit=10)
    state.update(reading(ttft=0.2, peak=0, running=1))
    state.update(reading(ttft=0.1, peak=0, running=1))
    assert state.ttft_floor_s == pytest.approx(0.1)
    state.update(reading(ttft=0.3, peak=0, running=1))
    assert state.ttft_floor_s == pytest.approx(0.15)


def test_a_saturated_pod_settles_around_what_its_engine_runs():
    """An engine that runs 6 at once and queues the rest: the limit climbs to it and stays within one of it."""
    state = PodLimit(SETTINGS)
    in_flight = 40  # demand is always above the limit
    limits = []
    for _ in range(200):
        running = min(in_flight, 6)
        state.update(Reading(waiting=in_flight - running, running=running, kv_usage=0.5, ttft_per_token_s=0.1, peak_in_flight=in_flight))
        in_flight = state.limit
        limits.append(state.limit)
    assert set(limits[-50:]) <= {6, 7}, limits[-50:]


def test_fixed_limits_are_the_cap_and_never_move():
    limits = ConcurrencyLimits(AdmissionSettings(max_inflight_per_pod=5, adaptive=False))
    pod = PodSet(["http://a"]).get("http://a")
    pod.stats = replace(pod.stats, waiting=10, running=1)
    assert limits.update(pod) is None
    assert limits.limit(pod) == 5


def test_gateway_ttfts_count_before_the_engines_mean():
    limits = ConcurrencyLimits(replace(SETTINGS, ttft_floor_drift=0.0))
    pod = PodSet(["http://a"]).get("http://a")
    pod.in_flight = 1
    pod.stats = replace(pod.stats, running=1, ttft_sum=10.0, ttft_count=100, computed_tokens=50_000)
    limits.update(pod)  # first look at the engine's histogram: no interval yet
    # The engine's over the interval: (12 - 10) s over 17,440 computed tokens + 20 x 128 = 0.1 ms per token.
    pod.stats = replace(pod.stats, ttft_sum=12.0, ttft_count=120, computed_tokens=67_440)
    limits.update(pod)
    assert limits._limits[pod.id].ttft_floor_s == pytest.approx(1e-4)
    # Three streams timed by the gateway outvote the engine's figure: 0.06 s for 472 tokens of work is the median.
    for seconds, work in ((0.05, 372), (0.06, 472), (0.9, 1872)):
        limits.first_token(pod, seconds, work)
    pod.stats = replace(pod.stats, ttft_sum=20.0, ttft_count=130, computed_tokens=70_000)
    limits.update(pod)
    assert limits._limits[pod.id].ttft_floor_s == pytest.approx(0.06 / 600)


def test_a_cache_hit_and_a_long_new_prompt_on_a_quiet_engine_read_alike_and_queueing_reads_as_such():
    """Per token of work, a hit's 0.1 s and a 1,900-token prompt's 1.0 s are within the tolerance; a hit
    that waited 1.0 s behind work the gateway did not queue there (the engine slowed down) is not."""
    limits = ConcurrencyLimits(SETTINGS)
    pod = PodSet(["http://a"]).get("http://a")
    pod.in_flight = limits.limit(pod)
    for seconds, work in ((0.1, 50), (0.1, 60), (0.12, 40)):
        limits.first_token(pod, seconds, work)
    pod.stats = replace(pod.stats, running=3)
    limits.update(pod)
    for seconds, work in ((1.0, 1900), (0.9, 1700), (1.1, 1950)):
        limits.first_token(pod, seconds, work)
    assert limits.update(pod).step is not Step.SHRINK
    for seconds, work in ((1.0, 50), (0.9, 60), (1.1, 40)):
        limits.first_token(pod, seconds, work)
    assert limits.update(pod).step is Step.SHRINK


def test_too_few_first_tokens_carry_over_to_the_next_scrape_instead_of_deciding():
    """One slow first token in an interval is not a figure: it waits for two more, which it is the median of."""
    limits = ConcurrencyLimits(SETTINGS)
    pod = PodSet(["http://a"]).get("http://a")
    pod.in_flight = limits.limit(pod)
    pod.stats = replace(pod.stats, running=3)
    for seconds in (0.1, 0.1, 0.12):
        limits.first_token(pod, seconds, 50)
    limits.update(pod)  # the floor: about 0.1 s per 178 tokens

    limits.first_token(pod, 1.0, 50)
    assert limits.update(pod).step is not Step.SHRINK
    for seconds in (0.1, 0.11):
        limits.first_token(pod, seconds, 50)
    assert limits.update(pod).step is not Step.SHRINK  # the median of the three is 0.11 s

    for seconds in (1.0, 0.9):
        limits.first_token(pod, seconds, 50)
    limits.update(pod)
    limits.first_token(pod, 1.1, 50)
    assert limits.update(pod).step is Step.SHRINK  # three slow ones, over two scrapes


def test_a_hit_queued_behind_a_long_prompt_is_timed_against_both():
    """The router sent a long prompt, then a hit, to one pod: the hit's 1 s is the 2,000 tokens it waited for,
    not congestion; the same 1 s with nothing queued ahead is."""

    def limit_after_slow_hits(queued_ahead: bool) -> Step:
        router, counters, _ = _two_pods_prefix_on_a(64)
        # prefix-cache: every request to the pod holding the most of it, whatever is queued there.
        policy = PolicyBook(PolicyDeps(RoutingSettings(), counters, random.Random(1))).get("prefix-cache")
        router.limits = ConcurrencyLimits(SETTINGS)
        pod = router.pods.get(PodId("http://a"))
        pod.stats = replace(pod.stats, running=3)
        for _ in range(3):  # quiet hits set the floor
            lease = router.try_acquire(_prefixed("u"), policy, "prefix-cache")
            lease.sent_at = time.monotonic() - 0.1
            lease.first_token()
            lease.release()
        pod.in_flight = router.limits.limit(pod)  # reached: the controller judges the interval
        router.limit_update(pod)
        pod.in_flight = 0
        if queued_ahead:
            one_block = RouteRequest(user=UserId("v"), model="tiny", prompt_tokens=2028, block_size=128, matched_blocks={pod.id: 1})
            long = router.try_acquire(one_block, policy, "prefix-cache")
            assert long.pod is pod and long.uncached_tokens == 1900
        for _ in range(3):
            lease = router.try_acquire(_prefixed("u"), policy, "prefix-cache")
            assert lease.pod is pod
            lease.sent_at = time.monotonic() - 1.0
            lease.first_token()
            lease.release()
        pod.in_flight = router.limits.limit(pod)
        return router.limit_update(pod).step

    assert limit_after_slow_hits(queued_ahead=True) is not Step.SHRINK
    assert limit_after_slow_hits(queued_ahead=False) is Step.SHRINK


def test_an_overloaded_answer_cuts_below_what_was_in_flight():
    limits = ConcurrencyLimits(SETTINGS)
    pod = PodSet(["http://a"]).get("http://a")
    pod.in_flight = 12
    limits.overloaded(pod)
    assert limits.limit(pod) == 11


def test_the_limit_is_exported_per_pod():
    registry = CollectorRegistry()
    pods = PodSet(["http://a", "http://b"])
    limits = ConcurrencyLimits(SETTINGS, registry, lambda: list(pods))
    pod = pods.get("http://a")
    pod.in_flight = 30
    pod.stats = replace(pod.stats, waiting=4, running=7)
    limits.update(pod)
    text = generate_latest(registry).decode()
    assert 'kvgate_pod_concurrency_limit{pod="http://a"} 7.0' in text
    assert 'kvgate_pod_concurrency_limit{pod="http://b"} 64.0' in text


def _request(user: str) -> RouteRequest:
    return RouteRequest(user=UserId(user), model="tiny", prompt_tokens=10, block_size=16)


def served_more_than_an_active_user(counters: VirtualTokenCounters, *users: str) -> None:
    """`users` have been served far more than a user with a request running: they are held to the limits."""
    counters.arrive(UserId("least-served"))
    for user in users:
        counters.charge(UserId(user), input_tokens=10_000)


def _limited_router(limit: int, *, adaptive: bool = True, cap: int = 4):
    pods = PodSet(["http://a"])
    counters = VirtualTokenCounters()
    settings = replace(SETTINGS, max_inflight_per_pod=cap, adaptive=adaptive)
    router = Router(pods, PrefixIndex(100), counters, settings, GatewayMetrics(), random.Random(1))
    policy = PolicyBook(PolicyDeps(RoutingSettings(), counters, random.Random(1))).get("least-request")
    if adaptive:
        router.limits._limits["http://a"] = PodLimit(settings, limit=limit)
    return router, counters, policy


@pytest.mark.parametrize(
    ("adaptive", "ahead", "placed"),
    [
        pytest.param(True, False, 4, id="adaptive-user-level-with-others-goes-up-to-the-cap"),
        pytest.param(True, True, 1, id="adaptive-user-ahead-is-held-to-the-limit"),
        pytest.param(False, False, 4, id="fixed-limit-is-the-cap-for-everyone"),
    ],
)
def test_only_users_ahead_of_others_are_held_to_the_adaptive_limit(adaptive, ahead, placed):
    router, counters, policy = _limited_router(1, adaptive=adaptive)
    if ahead:
        served_more_than_an_active_user(counters, "u")
    leases = [router.try_acquire(_request("u"), policy, "least-request") for _ in range(6)]
    assert sum(lease is not None for lease in leases) == placed


async def test_a_user_level_with_the_others_is_not_queued_behind_users_ahead():
    router, counters, policy = _limited_router(1)
    served_more_than_an_active_user(counters, "heavy")
    held = router.try_acquire(_request("heavy"), policy, "least-request")
    waiting = asyncio.create_task(router.acquire(_request("heavy"), policy, "least-request", timeout=5))
    await asyncio.sleep(0)
    assert held is not None and len(router.queue) == 1

    lease = await asyncio.wait_for(router.acquire(_request("least-served"), policy, "least-request", timeout=5), 1)

    assert lease.pod.in_flight == 2 and len(router.queue) == 1  # past the limit, under the cap
    held.release()
    lease.release()
    (await asyncio.wait_for(waiting, 1)).release()


async def test_a_waiter_is_dispatched_when_the_limit_grows():
    pods = PodSet(["http://a"])
    counters = VirtualTokenCounters()
    router = Router(pods, PrefixIndex(100), counters, SETTINGS, GatewayMetrics(), random.Random(1))
    policy = PolicyBook(PolicyDeps(RoutingSettings(), counters, random.Random(1))).get("least-request")
    pod = pods.get("http://a")
    served_more_than_an_active_user(counters, "u", "v")
    # The engine runs 2 and keeps more waiting: the limit falls to 2.
    pod.in_flight = 5
    pod.stats = replace(pod.stats, running=2, waiting=3)
    router.limit_update(pod)
    pod.in_flight = 0
    leases = [router.try_acquire(_request("u"), policy, "least-request") for _ in range(2)]
    assert all(leases) and router.try_acquire(_request("u"), policy, "least-request") is None
    waiter = asyncio.create_task(router.acquire(_request("v"), policy, "least-request", timeout=5))
    await asyncio.sleep(0)
    assert len(router.queue) == 1
    # The engine keeps up at the limit: it grows by one, and the waiter gets the new slot at once.
    pod.stats = replace(pod.stats, running=2, waiting=0)
    router.limit_update(pod)
    lease = await asyncio.wait_for(waiter, 1)
    assert lease.pod is pod and len(router.queue) == 0
    for held in (*leases, lease):
        held.release()


async def test_a_pod_backing_off_never_holds_a_waiter():
    """Overload backoff only steers a request to another pod with a free slot; it never makes one wait."""
    pods = PodSet(["http://a", "http://b"])
    counters = VirtualTokenCounters()
    router = Router(pods, PrefixIndex(100), counters, replace(SETTINGS, max_inflight_per_pod=1), GatewayMetrics(), random.Random(1))
    policy = PolicyBook(PolicyDeps(RoutingSettings(), counters, random.Random(1))).get("least-request")
    a, b = pods.get("http://a"), pods.get("http://b")
    a.backoff_until = time.monotonic() + 3600
    first = router.try_acquire(_request("u"), policy, "least-request")
    assert first is not None and first.pod is b  # the rested pod first
    second = await asyncio.wait_for(router.acquire(_request("u"), policy, "least-request", timeout=5), 1)
    assert second.pod is a and len(router.queue) == 0  # then the one backing off, at once
    first.release()
    second.release()


def _two_pods_prefix_on_a(limit: int):
    """Pods a (holding the request's 8-block prefix, adaptive limit `limit`) and b (empty, no limit), kv-aware."""
    pods = PodSet(["http://a", "http://b"])
    counters = VirtualTokenCounters()
    router = Router(pods, PrefixIndex(100), counters, SETTINGS, GatewayMetrics(), random.Random(1))
    router.limits._limits["http://a"] = PodLimit(SETTINGS, limit=limit)
    policy = PolicyBook(PolicyDeps(RoutingSettings(), counters, random.Random(1))).get("kv-aware")
    return router, counters, policy


def _prefixed(user: str, holder: str = "http://a") -> RouteRequest:
    return RouteRequest(
        user=UserId(user), model="tiny", prompt_tokens=1100, block_size=128, matched_blocks={PodId(holder): 8}
    )


async def test_a_held_request_waits_for_the_pod_at_its_limit_that_holds_its_prefix_instead_of_recomputing_it():
    router, counters, policy = _two_pods_prefix_on_a(1)
    served_more_than_an_active_user(counters, "heavy")
    first = router.try_acquire(_prefixed("heavy"), policy, "kv-aware")
    assert first is not None and first.pod.id == "http://a"

    # a is at its limit and still the cheapest: the request waits, b stays empty.
    assert router.try_acquire(_prefixed("heavy"), policy, "kv-aware") is None
    waiting = asyncio.create_task(router.acquire(_prefixed("heavy"), policy, "kv-aware", timeout=5))
    await asyncio.sleep(0)
    assert len(router.queue) == 1 and router.pods.get("http://b").in_flight == 0

    # A prompt that b serves as cheaply goes there at once; a user level with the others goes to a, up to the cap.
    elsewhere = router.try_acquire(_prefixed("heavy", holder="http://b"), policy, "kv-aware")
    level = router.try_acquire(_prefixed("least-served"), policy, "kv-aware")
    assert elsewhere is not None and elsewhere.pod.id == "http://b"
    assert level is not None and level.pod.id == "http://a"

    first.release()
    level.release()
    lease = await asyncio.wait_for(waiting, 1)
    assert lease.pod.id == "http://a" and len(router.queue) == 0
    lease.release()
    elsewhere.release()


def test_with_fixed_limits_a_full_holder_is_passed_over():
    router, counters, policy = _two_pods_prefix_on_a(1)
    router.settings = replace(SETTINGS, max_inflight_per_pod=1, adaptive=False)
    leases = [router.try_acquire(_prefixed("u"), policy, "kv-aware") for _ in range(2)]
    assert [lease.pod.id for lease in leases] == ["http://a", "http://b"]
