"""The router: selection and accounting in one step, leases, and waiting for a free slot."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvcache.keys import chain_hashes
from router.errors import NoCapacity, OverLimit
from router.fairness import VirtualTokenCounters
from router.index import PrefixIndex
from router.metrics import GatewayMetrics
from router.pods import PodId, PodSet, UserId
from router.policies import PolicyBook, PolicyDeps, RouteRequest
from router.routing import Router
from router.settings import AdmissionSettings, RoutingSettings

BLOCK = 16
URLS = ["http://pod-a:8000", "http://pod-b:8000", "http://pod-c:8000", "http://pod-d:8000"]


class Fleet:
    """A router over `n` pods, built as the gateway builds it."""

    def __init__(
        self, n: int = 4, *, max_inflight: int = 64, max_queue: int = 16, queue_timeout_s: float = 5.0, hold_s: float = 0.1
    ) -> None:
        self.pods = PodSet(URLS[:n])
        self.index = PrefixIndex()
        self.counters = VirtualTokenCounters()
        self.metrics = GatewayMetrics()
        self.router = Router(
            self.pods,
            self.index,
            self.counters,
            AdmissionSettings(
                max_inflight_per_pod=max_inflight, max_queue=max_queue, queue_timeout_s=queue_timeout_s, hold_for_return_s=hold_s
            ),
            self.metrics,
            random.Random(0),
        )
        self.book = PolicyBook(PolicyDeps(RoutingSettings(block_size=BLOCK), self.counters, random.Random(0)))

    def request(self, *, user: str = "alice", prompt_tokens: int = 100, tokens: list[int] | None = None, matched=None):
        hashes = tuple(chain_hashes(tokens, BLOCK)) if tokens else ()
        return RouteRequest(
            user=UserId(user),
            model="tiny",
            prompt_tokens=len(tokens) if tokens else prompt_tokens,
            block_size=BLOCK,
            block_hashes=hashes,
            matched_blocks=self.index.match(hashes) if matched is None else matched,
        )

    def try_acquire(self, spec: str = "least-request", **kwargs):
        return self.router.try_acquire(self.request(**kwargs), self.book.get(spec), spec)

    async def acquire(self, spec: str = "least-request", timeout: float | None = None, **kwargs):
        return await self.router.acquire(self.request(**kwargs), self.book.get(spec), spec, timeout=timeout)

    def in_flight(self) -> dict[str, int]:
        return {pod.id: pod.in_flight for pod in self.pods}

    def totals(self) -> tuple[int, int, int]:
        return (
            sum(p.in_flight for p in self.pods),
            sum(p.pending_prefill for p in self.pods),
            sum(p.decoding for p in self.pods),
        )

    def gauge(self, pod: str) -> float | None:
        return self.metrics.registry.get_sample_value("kvgate_pod_in_flight", {"pod": pod})


async def settle() -> None:
    """Let every ready task run up to its next real wait."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- selection and accounting -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "burst"),
    [
        pytest.param(2, 10, id="2-pods"),
        pytest.param(4, 12, id="4-pods"),
        pytest.param(3, 30, id="3-pods-long-burst"),
    ],
)
def test_a_burst_spreads_evenly_because_selection_counts_at_once(pods, burst):
    fleet = Fleet(pods)

    leases = [fleet.try_acquire() for _ in range(burst)]

    assert all(lease is not None for lease in leases)
    assert set(fleet.in_flight().values()) == {burst // pods}


def test_try_acquire_returns_none_when_every_pod_is_full():
    fleet = Fleet(2, max_inflight=3)
    leases = [fleet.try_acquire() for _ in range(6)]

    assert all(lease is not None for lease in leases)
    assert fleet.try_acquire() is None
    assert fleet.in_flight() == {URLS[0]: 3, URLS[1]: 3}

    leases[0].release()

    assert fleet.try_acquire() is not None


def test_a_full_pod_is_skipped_even_when_the_policy_prefers_it():
    fleet = Fleet(2, max_inflight=1)
    tokens = list(range(4 * BLOCK))
    first = fleet.try_acquire("prefix-cache", tokens=tokens)

    second = fleet.try_acquire("prefix-cache", tokens=tokens)

    assert second is not None
    assert second.pod is not first.pod


def test_excluded_and_unhealthy_pods_are_never_chosen():
    fleet = Fleet(3)
    fleet.pods.get(PodId(URLS[1])).healthy = False
    policy = fleet.book.get("least-request")

    chosen = {fleet.router.try_acquire(fleet.request(), policy, "least-request", exclude={URLS[0]}).pod.id for _ in range(5)}

    assert chosen == {URLS[2]}


def test_pods_serving_other_models_are_not_candidates():
    fleet = Fleet(2)
    fleet.pods.get(PodId(URLS[0])).models = frozenset({"other"})
    fleet.pods.get(PodId(URLS[1])).models = frozenset({"tiny"})

    assert [p.id for p in fleet.router.candidates("tiny")] == [URLS[1]]
    assert [p.id for p in fleet.router.candidates("other")] == [URLS[0]]


def test_acquire_counts_the_uncached_prompt_as_pending_prefill():
    fleet = Fleet(1)

    lease = fleet.try_acquire(prompt_tokens=100, matched={URLS[0]: 2})

    assert (lease.pod.in_flight, lease.pod.pending_prefill, lease.pod.decoding) == (1, 100 - 2 * BLOCK, 0)
    assert lease.matched_blocks == 2
    assert fleet.counters.get(UserId("alice")) == 100.0  # the prompt is charged to the user
    assert fleet.gauge(URLS[0]) == 1.0


def test_first_token_moves_pending_prefill_to_decoding():
    fleet = Fleet(1)
    lease = fleet.try_acquire(prompt_tokens=100)

    lease.first_token()
    lease.first_token()  # idempotent

    assert (lease.pod.in_flight, lease.pod.pending_prefill, lease.pod.decoding) == (1, 0, 1)


@pytest.mark.parametrize(
    "answered", [pytest.param(False, id="before-first-token"), pytest.param(True, id="after-first-token")]
)
def test_release_is_idempotent_and_restores_the_pod(answered):
    fleet = Fleet(1)
    lease = fleet.try_acquire(prompt_tokens=100)
    other = fleet.try_acquire(prompt_tokens=50)
    if answered:
        lease.first_token()

    lease.release()
    lease.release()
    lease.first_token()  # too late: nothing changes

    assert (lease.pod.in_flight, lease.pod.pending_prefill, lease.pod.decoding) == (1, 50, 0)
    assert fleet.gauge(URLS[0]) == 1.0
    other.release()
    assert fleet.totals() == (0, 0, 0)
    assert fleet.gauge(URLS[0]) == 0.0


def test_the_prompts_blocks_are_recorded_on_the_chosen_pod():
    fleet = Fleet(3)
    tokens = list(range(5 * BLOCK + 3))
    hashes = chain_hashes(tokens, BLOCK)

    lease = fleet.try_acquire("least-request", tokens=tokens)

    assert fleet.index.match(hashes) == {lease.pod.id: 5}


def test_a_repeated_prompt_follows_its_blocks_under_prefix_cache():
    fleet = Fleet(4)
    prompts = [list(range(k * 1000, k * 1000 + 8 * BLOCK)) for k in range(6)]
    first = {}
    for k, tokens in enumerate(prompts):
        lease = fleet.try_acquire("prefix-cache", tokens=tokens)
        first[k] = lease.pod
        # While it runs its pod is above mean + std of four and would be skipped: finish it.
        lease.release()

    assert len(set(first.values())) > 1  # the prompts were spread, so following them is not luck
    for k, tokens in enumerate(prompts):
        again = fleet.try_acquire("prefix-cache", tokens=tokens)
        assert again.pod is first[k]
        assert (again.matched_blocks, again.uncached_tokens) == (8, 0)
        again.release()


def test_decisions_are_counted_in_metrics():
    fleet = Fleet(1)
    tokens = list(range(4 * BLOCK))
    fleet.try_acquire(tokens=tokens)
    fleet.try_acquire(tokens=tokens)

    get = fleet.metrics.registry.get_sample_value
    assert get("kvgate_prompt_tokens_total", {"pod": URLS[0]}) == 2 * 4 * BLOCK
    assert get("kvgate_predicted_prefix_hit_tokens_total", {"pod": URLS[0]}) == 4 * BLOCK
    assert get("kvgate_routing_decision_seconds_count") == 2


# -- waiting for a slot -----------------------------------------------------------------------


async def test_acquire_takes_a_free_slot_at_once():
    fleet = Fleet(2)

    lease = await fleet.acquire()

    assert lease.pod.in_flight == 1
    assert len(fleet.router.queue) == 0
    lease.release()


async def test_acquire_without_any_pod_for_the_model_fails_at_once():
    fleet = Fleet(1)
    fleet.pods.get(PodId(URLS[0])).healthy = False

    with pytest.raises(NoCapacity) as caught:
        await fleet.acquire()

    assert caught.value.status == 503
    assert len(fleet.router.queue) == 0


async def test_acquire_waits_and_gets_the_slot_another_request_releases():
    fleet = Fleet(1, max_inflight=1)
    holder = await fleet.acquire()
    waiting = asyncio.create_task(fleet.acquire(user="bob"))
    await settle()
    assert not waiting.done()
    assert len(fleet.router.queue) == 1

    holder.release()
    lease = await asyncio.wait_for(waiting, 1)

    assert lease.pod is holder.pod
    assert lease.pod.in_flight == 1
    assert len(fleet.router.queue) == 0
    lease.release()
    assert fleet.totals() == (0, 0, 0)


async def test_waiters_are_served_smallest_counter_first():
    fleet = Fleet(1, max_inflight=1)
    fleet.counters.charge(UserId("heavy"), input_tokens=10_000)
    holder = await fleet.acquire(user="holder")
    heavy = asyncio.create_task(fleet.acquire(user="heavy"))
    await settle()
    light = asyncio.create_task(fleet.acquire(user="light"))  # arrives later, has consumed less
    await settle()

    holder.release()
    await settle()

    assert light.done() and not heavy.done()
    light.result().release()
    await settle()
    assert heavy.done()
    heavy.result().release()
    assert fleet.totals() == (0, 0, 0)


async def test_a_new_arrival_does_not_overtake_the_queue():
    fleet = Fleet(2, max_inflight=1)
    spare = fleet.pods.get(PodId(URLS[1]))
    spare.healthy = False
    holder = await fleet.acquire(user="holder")
    early = asyncio.create_task(fleet.acquire(user="early"))
    await settle()
    fleet.counters.charge(UserId("late"), input_tokens=1)  # so the queue's order is not a tie

    spare.healthy = True  # a slot frees without any release
    late = asyncio.create_task(fleet.acquire(user="late"))
    await settle()

    assert early.done() and not late.done()
    assert early.result().pod is spare
    holder.release()
    early.result().release()
    (await asyncio.wait_for(late, 1)).release()
    assert fleet.totals() == (0, 0, 0)


async def test_acquire_times_out_with_no_capacity():
    fleet = Fleet(1, max_inflight=1)
    holder = await fleet.acquire()

    with pytest.raises(NoCapacity) as caught:
        await fleet.acquire(user="bob", timeout=0.02)

    assert caught.value.status == 503
    assert len(fleet.router.queue) == 0
    assert fleet.metrics.registry.get_sample_value("kvgate_admission_queue_length") == 0
    holder.release()
    assert fleet.totals() == (0, 0, 0)


async def test_a_full_queue_refuses_with_over_limit():
    fleet = Fleet(1, max_inflight=1, max_queue=1)
    holder = await fleet.acquire()
    waiting = asyncio.create_task(fleet.acquire(user="bob"))
    await settle()

    with pytest.raises(OverLimit):
        await fleet.acquire(user="carol")

    holder.release()
    (await asyncio.wait_for(waiting, 1)).release()
    assert fleet.totals() == (0, 0, 0)


async def test_a_cancelled_waiter_leaves_nothing_behind():
    fleet = Fleet(1, max_inflight=1)
    holder = await fleet.acquire()
    waiting = asyncio.create_task(fleet.acquire(user="bob"))
    await settle()

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    assert len(fleet.router.queue) == 0
    holder.release()
    assert fleet.totals() == (0, 0, 0)


async def test_a_cancelled_waiter_does_not_take_the_slot_from_the_next_one():
    fleet = Fleet(1, max_inflight=1)
    holder = await fleet.acquire()
    gone = asyncio.create_task(fleet.acquire(user="bob"))
    await settle()
    stays = asyncio.create_task(fleet.acquire(user="carol"))
    await settle()

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    holder.release()
    lease = await asyncio.wait_for(stays, 1)

    assert fleet.totals()[0] == 1
    lease.release()
    assert fleet.totals() == (0, 0, 0)
    assert len(fleet.router.queue) == 0


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_gives_the_slot_back():
    fleet = Fleet(1, max_inflight=1)
    holder = await fleet.acquire()
    waiting = asyncio.create_task(fleet.acquire(user="bob"))
    await settle()

    holder.release()  # hands the slot to the waiter...
    waiting.cancel()  # ...which gives up in the same loop tick
    outcome = await asyncio.gather(waiting, return_exceptions=True)

    if not isinstance(outcome[0], asyncio.CancelledError):
        outcome[0].release()  # keep later tests clean whatever happened
    assert isinstance(outcome[0], asyncio.CancelledError)
    assert fleet.totals() == (0, 0, 0)
    assert len(fleet.router.queue) == 0


# -- slots kept for returning users -------------------------------------------------------------


async def a_closed_loop_user(fleet: Fleet, user: str):
    """`user` has a lease and came back at once after a previous one ended (so it loops)."""
    first = await fleet.acquire(user=user)
    first.release()
    return await fleet.acquire(user=user)


async def light_loops_while_heavy_waits(hold_s: float, pods: int = 1):
    """One slot per pod; "light" (served little, looping) holds one, "heavy" (served much) waits."""
    fleet = Fleet(pods, max_inflight=1, hold_s=hold_s)
    fleet.counters.charge(UserId("heavy"), input_tokens=10_000)
    lease = await a_closed_loop_user(fleet, "light")
    other = await fleet.acquire(user="other") if pods > 1 else None
    heavy = asyncio.create_task(fleet.acquire(user="heavy"))
    await settle()
    return fleet, lease, heavy, other


@pytest.mark.parametrize("returns_after", [0.0, 0.02], ids=["at-once", "after-20ms"])
async def test_a_returning_user_keeps_its_slot_against_a_heavier_waiter(returns_after):
    fleet, lease, heavy, _ = await light_loops_while_heavy_waits(2.0)

    lease.release()
    await settle()
    assert not heavy.done()  # the slot is kept for light's next request
    await asyncio.sleep(returns_after)
    again = await asyncio.wait_for(fleet.acquire(user="light"), 1)  # at once, not when the hold lapses

    assert again.pod is lease.pod and not heavy.done()
    assert len(fleet.router.holds) == 0
    fleet.counters.charge(UserId("light"), input_tokens=20_000)  # now served more: nothing is kept for it
    again.release()
    (await asyncio.wait_for(heavy, 1)).release()
    assert fleet.totals() == (0, 0, 0)


async def test_a_kept_slot_goes_to_the_queue_when_its_user_does_not_come_back():
    fleet, lease, heavy, _ = await light_loops_while_heavy_waits(0.05)

    lease.release()
    got = await asyncio.wait_for(heavy, 1)

    assert got.pod is lease.pod and len(fleet.router.holds) == 0
    got.release()
    # light did not come back in time: its next release keeps nothing until it loops again
    late = await fleet.acquire(user="light")
    waiting = asyncio.create_task(fleet.acquire(user="heavy"))
    await settle()
    late.release()
    await settle()
    assert waiting.done()
    waiting.result().release()
    assert fleet.totals() == (0, 0, 0)


@pytest.mark.parametrize(
    ("loops", "light_charge"),
    [
        pytest.param(False, 0, id="user-never-came-back-at-once"),
        pytest.param(True, 20_000, id="user-served-more-than-the-waiter"),
    ],
)
async def test_no_slot_is_kept_for_a_user_that_would_not_go_first_or_does_not_loop(loops, light_charge):
    fleet = Fleet(1, max_inflight=1, hold_s=0.1)
    fleet.counters.charge(UserId("heavy"), input_tokens=10_000)
    lease = await a_closed_loop_user(fleet, "light") if loops else await fleet.acquire(user="light")
    fleet.counters.charge(UserId("light"), input_tokens=light_charge)
    heavy = asyncio.create_task(fleet.acquire(user="heavy"))
    await settle()

    lease.release()
    await settle()

    assert heavy.done() and len(fleet.router.holds) == 0
    heavy.result().release()
    assert fleet.totals() == (0, 0, 0)


async def test_a_kept_slot_is_given_back_when_its_user_lands_on_another_pod():
    fleet, lease, heavy, other = await light_loops_while_heavy_waits(0.1, pods=2)  # both pods full

    lease.release()  # kept for light
    other.release()  # other never looped: heavy takes this slot at once
    await settle()
    assert heavy.done() and heavy.result().pod is other.pod
    heavy.result().release()  # heavy's slot is free now, light's is still kept
    again = await asyncio.wait_for(fleet.acquire(user="light"), 1)

    assert len(fleet.router.holds) == 0  # whichever pod light landed on, nothing stays kept
    again.release()
    assert fleet.totals() == (0, 0, 0)
    assert fleet.router.try_acquire(fleet.request(user="x"), fleet.book.get("least-request"), "least-request") is not None


async def test_a_pod_that_leaves_takes_its_kept_slots_with_it():
    fleet, lease, heavy, _ = await light_loops_while_heavy_waits(10.0)
    lease.release()
    await settle()
    assert len(fleet.router.holds) == 1

    fleet.router.forget_pod(lease.pod.id)

    assert len(fleet.router.holds) == 0
    fleet.router.dispatch_waiting()
    (await asyncio.wait_for(heavy, 1)).release()
