"""Shortlisted routing decisions equal the full scan's, on randomised fleets as load changes.

Each case builds a fleet of 40 to 160 pods with random engine figures, index
contents and capacities, then runs a random sequence of operations (route a
request, first token, release, a pod going down or coming back, peers' load
arriving or a peer leaving, blocks evicted, a scrape). Before every routing
decision the test prices every eligible pod itself (the old full scan) and
checks that the router, shortlisting, picks a pod of the least cost and, among
equal costs, of the fewest requests in flight.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from kvcache.keys import chain_hashes
from router.fairness import VirtualTokenCounters
from router.fleet_order import TIE_CAP, FleetOrder, IndexOccupancy
from router.index import PrefixIndex
from router.metrics import GatewayMetrics
from router.pods import EngineStats, PodId, PodSet, UserId
from router.policies import PolicyBook, PolicyDeps, RouteRequest
from router.routing import Router
from router.settings import AdmissionSettings, RoutingSettings
from router.shared_tier import SharedTier
from router.state.base import FleetView
from router.state.ledger import PeerLedger

BLOCK = 16


class RandomFleet:
    """A router over a random fleet, with the operations that change its load."""

    def __init__(self, seed: int, *, live_occupancy: bool = True, shared: bool = False) -> None:
        self.rng = random.Random(seed)
        n = self.rng.randint(40, 160)
        self.limit = self.rng.choice([3, 8, 1000])
        self.pods = PodSet(f"http://pod-{i}:8000" for i in range(n))
        self.index = PrefixIndex(default_capacity=self.rng.choice([8, 64, 512]))
        self.counters = VirtualTokenCounters()
        self.router = Router(
            self.pods,
            self.index,
            self.counters,
            AdmissionSettings(max_inflight_per_pod=self.limit),
            GatewayMetrics(),
            random.Random(seed),
            shortlist_above=0,
        )
        routing = RoutingSettings(
            block_size=BLOCK,
            prefix_copy_weight=self.rng.choice([0.0, 1.0, 2.5]),
            queued_prefill_weight=self.rng.choice([0.0, 0.3, 1.0]),
        )
        self.book = PolicyBook(PolicyDeps(routing, self.counters, random.Random(seed)))
        self.ledger = PeerLedger(FleetView(self.pods, self.index, self.counters, lambda: None))
        self.ledger.attach(self.pods)
        self.live_occupancy = live_occupancy
        self.prefixes = [[self.rng.randrange(50_000) for _ in range(BLOCK * 8)] for _ in range(12)]
        self.leases: list = []
        for pod in self.pods:
            if self.rng.random() < 0.5:
                pod.stats = EngineStats(running=self.rng.randint(0, 6), waiting=self.rng.randint(0, 3))
            if self.rng.random() < 0.3:
                self.index.set_capacity(pod.id, self.rng.choice([4, 16, 100]))
            for _ in range(self.rng.randint(0, 3)):
                self.index.insert(pod.id, self.hashes(self.prompt()))
            if self.rng.random() < 0.1:
                pod.models = frozenset({"other"})
        # A shared KV cache holding some prefixes, loaded by most pods (not all) at a random ratio.
        self.shared = SharedTier() if shared else None
        self.uses = {pod.id: self.rng.random() < 0.8 for pod in self.pods}
        for _ in range(self.rng.randint(0, 8) if shared else 0):
            self.share()

    def prompt(self) -> list[int]:
        prefix = self.rng.choice(self.prefixes)[: BLOCK * self.rng.randint(0, 8)]
        return prefix + [self.rng.randrange(50_000) for _ in range(self.rng.randint(1, self.rng.choice([64, 300, 3000])))]

    def share(self) -> None:
        """A prefix (part of one) reaches the shared cache."""
        assert self.shared is not None
        self.shared.confirm(self.hashes(self.rng.choice(self.prefixes)[: BLOCK * self.rng.randint(1, 8)]))

    @staticmethod
    def hashes(tokens: list[int]) -> tuple:
        return tuple(chain_hashes(tokens, BLOCK))

    def request(self) -> RouteRequest:
        tokens = self.prompt()
        hashes = self.hashes(tokens)
        return RouteRequest(
            user=UserId("u"),
            model="tiny",
            prompt_tokens=len(tokens),
            block_size=BLOCK,
            block_hashes=hashes,
            matched_blocks=self.index.match(hashes),
            occupancy=IndexOccupancy(self.index.eviction_price, self.pods) if self.live_occupancy else {},
            tiers=None
            if self.shared is None
            else self.shared.match(
                hashes, len(tokens), BLOCK, self.rng.choice([0.05, 0.3, 1.0, 1.5]), lambda pod: self.uses[pod.id]
            ),
        )

    def step(self, spec: str) -> None:
        """One random operation; a routing decision is checked against the full scan."""
        roll = self.rng.random()
        pods = list(self.pods)
        pod = self.rng.choice(pods)
        if roll < 0.45:
            self.check_decision(spec)
        elif roll < 0.55 and self.leases:
            self.leases[self.rng.randrange(len(self.leases))].first_token()
        elif roll < 0.7 and self.leases:
            self.leases.pop(self.rng.randrange(len(self.leases))).release()
        elif roll < 0.72:
            pod.healthy = not pod.healthy
        elif roll < 0.74:
            pod.ejected = not pod.ejected  # outlier detection took it out, or let it back
        elif roll < 0.75:
            # Overloaded (429/503): avoided while another pod with a free slot can serve.
            pod.backoff_until = 0.0 if pod.backoff_until else time.monotonic() + 3600
        elif roll < 0.85:
            replica = f"peer-{self.rng.randint(0, 2)}"
            if self.rng.random() < 0.1:
                self.ledger.drop(replica)
            else:
                self.ledger.reserved(replica, pod.id, self.rng.randint(0, 3000))
        elif roll < 0.9:
            # The engine restarted or evicted everything: the monitor drops and touches it.
            self.index.drop_pod(pod.id)
            pod.touch()
        elif self.shared is not None and roll < 0.93:
            self.share()
        else:
            pod.stats = replace(pod.stats, running=self.rng.randint(0, 8), waiting=self.rng.randint(0, 4))

    def check_decision(self, spec: str) -> None:
        policy = self.book.get(spec)
        request = self.request()
        exclude = {self.rng.choice(list(self.pods)).id} if self.rng.random() < 0.2 else set()
        eligible = self.router.candidates("tiny", exclude, self.limit)
        costs = dict(zip(eligible, policy.costs(request, eligible), strict=True))
        best = min(((cost, pod.in_flight) for pod, cost in costs.items()), default=None)
        lease = self.router.try_acquire(request, policy, spec, exclude)
        if best is None:
            assert lease is None
            return
        assert lease is not None
        chosen = lease.pod
        assert (costs[chosen], chosen.in_flight - 1) == best, f"{spec}: picked {chosen.id}"
        self.leases.append(lease)


@pytest.mark.parametrize("spec", ["kv-aware", "least-request"])
@pytest.mark.parametrize("seed", range(12))
def test_shortlist_picks_what_the_full_scan_picks(spec: str, seed: int) -> None:
    fleet = RandomFleet(seed)
    for _ in range(300):
        fleet.step(spec)


@pytest.mark.parametrize("seed", range(8))
def test_kv_aware_shortlist_with_a_shared_kv_cache_picks_what_the_full_scan_picks(seed: int) -> None:
    fleet = RandomFleet(300 + seed, shared=True)
    for _ in range(300):
        fleet.step("kv-aware")


@pytest.mark.parametrize("seed", range(4))
def test_kv_aware_shortlist_without_the_index_view_uses_a_safe_bound(seed: int) -> None:
    fleet = RandomFleet(100 + seed, live_occupancy=False)
    for _ in range(300):
        fleet.step("kv-aware")


def test_a_mix_of_shortlisting_policies_prices_the_union_and_stays_within_the_limit() -> None:
    fleet = RandomFleet(7)
    policy = fleet.book.get("kv-aware:2,least-request:1")
    assert hasattr(policy, "shortlist")
    for _ in range(200):
        lease = fleet.router.try_acquire(fleet.request(), policy, "mix")
        if lease is None:
            assert all(p.fleet_in_flight >= fleet.limit for p in fleet.router.candidates("tiny"))
            break
        assert lease.pod.fleet_in_flight <= fleet.limit
        fleet.leases.append(lease)


def test_a_mix_with_a_part_that_needs_every_pod_is_not_shortlisted() -> None:
    fleet = RandomFleet(3)
    assert not hasattr(fleet.book.get("kv-aware:1,round-robin:1"), "shortlist")


@pytest.mark.parametrize("seed", range(6))
def test_orderings_stay_sorted_by_the_current_load_as_it_changes(seed: int) -> None:
    fleet = RandomFleet(200 + seed)
    order = fleet.router.fleet
    for _ in range(300):
        fleet.step("kv-aware")
        order.sync()
        for ordering in order._orderings.values():
            entries = ordering.sorted
            held = {entry[3]: entry[0] for entry in entries}
            assert held == {pod: ordering.key(pod) for pod in fleet.pods if pod.healthy}
            assert list(entries) == sorted(entries, key=lambda e: e[:3])
    assert len(order._orderings) >= 3  # load alone and fullness scales, as prompt lengths needed


def test_pods_joining_and_leaving_the_table_enter_and_leave_the_orderings() -> None:
    pods = PodSet(["http://a:1", "http://b:1"])
    order = FleetOrder(pods)
    entries = order.ordering("in-flight", lambda pod: float(pod.in_flight))
    assert [e[3].id for e in entries] == ["http://a:1", "http://b:1"]
    pods.get(PodId("http://a:1")).in_flight = 5
    pods.add("http://c:1")
    order.sync()
    assert [e[3].id for e in entries] == ["http://b:1", "http://c:1", "http://a:1"]
    pods.remove(PodId("http://b:1"))
    pods.get(PodId("http://c:1")).healthy = False
    order.sync()
    assert [e[3].id for e in entries] == ["http://a:1"]


def test_an_idle_fleet_spreads_over_pods_and_prefers_fewer_in_flight() -> None:
    fleet = RandomFleet(11)
    for pod in fleet.pods:
        pod.stats = EngineStats()
        fleet.index.drop_pod(pod.id)
        pod.touch()
    policy = fleet.book.get("least-request")
    chosen = set()
    for _ in range(20):
        chosen.add(fleet.router.try_acquire(fleet.request(), policy, "least-request").pod)
    assert len(chosen) == 20  # each pick loaded a pod, so the next went elsewhere


def test_the_table_counts_the_models_its_pods_list_as_they_change() -> None:
    pods = PodSet(["http://a:1", "http://b:1"])
    a, b = pods.get(PodId("http://a:1")), pods.get(PodId("http://b:1"))
    assert not pods.serves("tiny") and pods.model_names() == []
    a.models = frozenset({"tiny", "tiny-lora"})
    a.adapters = frozenset({"tiny-lora"})
    b.models = frozenset({"tiny"})
    assert pods.serves("tiny") and pods.is_adapter("tiny-lora") and not pods.is_adapter("tiny")
    pods.remove(a.id)
    assert pods.model_names() == ["tiny"] and not pods.is_adapter("tiny-lora")
    b.models = frozenset()
    assert not pods.serves("tiny")


def test_the_table_knows_the_longest_context_of_healthy_pods_serving_a_model() -> None:
    pods = PodSet(["http://a:1", "http://b:1", "http://c:1"])
    a, b, c = (pods.get(PodId(f"http://{n}:1")) for n in "abc")
    for pod, length in ((a, 4096), (b, 8192), (c, 8192)):
        pod.models = frozenset({"tiny"})
        pod.max_model_len = length
    assert pods.max_model_len("tiny") == 8192 and pods.max_model_len("other") is None
    b.healthy = False
    assert pods.max_model_len("tiny") == 8192  # c still serves that much
    pods.remove(c.id)
    assert pods.max_model_len("tiny") == 4096
    b.healthy = True
    a.max_model_len = None
    assert pods.max_model_len("tiny") == 8192
    b.models = frozenset({"other"})
    assert pods.max_model_len("tiny") is None and pods.max_model_len("other") == 8192
    b.max_model_len = True  # not a length
    assert pods.max_model_len("other") is None


def test_on_an_idle_fleet_the_kv_aware_walk_stops_after_a_few_tied_pods() -> None:
    pods = PodSet(f"http://pod-{i}:8000" for i in range(2_000))
    index = PrefixIndex()
    counters = VirtualTokenCounters()
    router = Router(pods, index, counters, AdmissionSettings(), GatewayMetrics(), random.Random(0))
    policy = PolicyBook(PolicyDeps(RoutingSettings(block_size=BLOCK), counters, random.Random(0))).get("kv-aware")
    request = RouteRequest(
        user=UserId("u"), model="tiny", prompt_tokens=300, block_size=BLOCK,
        occupancy=IndexOccupancy(index.eviction_price, pods),
    )
    router.fleet.sync()
    shortlist = policy.shortlist(request, router.fleet, lambda pod: True)
    assert 1 <= len(shortlist) <= TIE_CAP
    assert {cost for cost in policy.costs(request, shortlist)} == {300.0}
