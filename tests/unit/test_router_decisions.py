"""The router records each decision as it made it: candidates, costs, matched blocks, load before."""

from __future__ import annotations

import random

from router.decisions import DECISIONS_KEPT, decision
from router.fairness import VirtualTokenCounters
from router.index import PrefixIndex
from router.metrics import GatewayMetrics
from router.pods import PodId, PodSet, UserId
from router.policies import PolicyBook, PolicyDeps, RouteRequest
from router.routing import Router
from router.settings import AdmissionSettings, RoutingSettings


def make_router(n: int = 3) -> tuple[Router, PolicyBook, list[PodId]]:
    pods = PodSet(f"http://10.0.0.{i}:8000" for i in range(n))
    counters = VirtualTokenCounters()
    router = Router(pods, PrefixIndex(1000), counters, AdmissionSettings(), GatewayMetrics(), random.Random(1))
    return router, PolicyBook(PolicyDeps(RoutingSettings(), counters, random.Random(1))), [p.id for p in pods]


def request(matched: dict[PodId, int]) -> RouteRequest:
    return RouteRequest(user=UserId("alice"), model="m", prompt_tokens=300, block_size=128, matched_blocks=matched)


def test_record_shows_every_candidate_cheapest_first_with_load_before_the_decision():
    router, book, ids = make_router()
    router.pods.get(ids[0]).in_flight = 5  # busy: least-request prices it highest
    lease = router.try_acquire(request({ids[1]: 2, ids[2]: 1}), book.get("least-request"), "least-request")
    assert lease is not None
    d = decision(router.decisions[-1])
    assert d.pod == lease.pod.id and d.policy == "least-request" and d.user == "alice"
    assert [c.cost for c in d.candidates] == sorted(c.cost for c in d.candidates)
    assert d.candidates[-1].pod == ids[0] and d.candidates[-1].in_flight == 5
    chosen = next(c for c in d.candidates if c.pod == d.pod)
    assert chosen.in_flight == 0  # before the decision, though the pod now has one in flight
    assert lease.pod.in_flight == 1
    assert d.matched_tokens == min(chosen.matched_blocks * 128, 300)
    assert {c.pod: c.matched_blocks for c in d.candidates} == {ids[0]: 0, ids[1]: 2, ids[2]: 1}


def test_only_the_most_recent_decisions_are_kept():
    router, book, _ = make_router()
    for _ in range(DECISIONS_KEPT + 10):
        lease = router.try_acquire(request({}), book.get("round-robin"), "round-robin")
        assert lease is not None
        lease.release()
    assert len(router.decisions) == DECISIONS_KEPT
