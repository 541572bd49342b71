"""`PeerLedger`: the peers' load per pod and active users, kept apart per peer so each can be subtracted exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from router.pods import PodId, PodSet, UserId
from router.state.base import FleetView
from router.state.ledger import PeerLedger

A, B = PodId("http://a"), PodId("http://b")


@dataclass
class Counters:
    peer_active: dict[UserId, int] = field(default_factory=dict)

    def add(self, user: UserId, cost: float) -> None:
        raise AssertionError("the ledger never charges")

    def set_peer_active(self, user: UserId, count: int) -> None:
        self.peer_active[user] = count

    def snapshot(self) -> dict[UserId, float]:
        return {}


@dataclass
class Harness:
    ledger: PeerLedger
    pods: PodSet
    counters: Counters
    capacity_calls: list[None]

    def load(self, pod: PodId) -> tuple[int, int, int]:
        peer = self.ledger.total(pod)
        return (peer.in_flight, peer.pending_prefill, peer.decoding)


@pytest.fixture
def h() -> Harness:
    pods = PodSet(["http://a", "http://b"])
    counters = Counters()
    calls: list[None] = []
    view = FleetView(pods=pods, index=None, counters=counters, on_capacity=lambda: calls.append(None))  # type: ignore[arg-type]
    ledger = PeerLedger(view)
    ledger.attach(pods)
    return Harness(ledger, pods, counters, calls)


def _hello(h: Harness, *replicas: str) -> None:
    for replica in replicas:
        h.ledger.replace(replica, {}, {})


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param([("reserved", "r1", A, 100)], (1, 100, 0), id="reserved-queues-prefill"),
        pytest.param([("reserved", "r1", A, 100), ("first_token", "r1", A, 100)], (1, 0, 1), id="first-token-decodes"),
        pytest.param(
            [("reserved", "r1", A, 100), ("first_token", "r1", A, 100), ("released", "r1", A, 100, True)],
            (0, 0, 0),
            id="released-after-first-token",
        ),
        pytest.param([("reserved", "r1", A, 100), ("released", "r1", A, 100, False)], (0, 0, 0), id="released-before-first-token"),
        pytest.param([("reserved", "r1", A, 10), ("reserved", "r2", A, 20)], (2, 30, 0), id="two-peers-sum"),
        pytest.param([("reserved", "r1", A, 10), ("reserved", "r1", B, 20)], (1, 10, 0), id="other-pod-apart"),
        pytest.param([("reserved", "stranger", A, 10)], (0, 0, 0), id="unknown-peer-ignored"),
    ],
)
def test_changes_add_up_per_pod(h: Harness, steps, expected):
    _hello(h, "r1", "r2")
    for name, *args in steps:
        getattr(h.ledger, name)(*args)

    assert h.load(A) == expected
    assert h.pods.get(A).peer is h.ledger.total(A), "the pod reads the peers' totals with no lookup"


@pytest.mark.parametrize(
    ("how", "survivor_load"),
    [
        pytest.param(lambda l: l.drop("r1"), (1, 20, 0), id="drop"),
        pytest.param(lambda l: l.keep_only(["r2"]), (1, 20, 0), id="keep-only"),
        pytest.param(lambda l: l.drop_all(), (0, 0, 0), id="drop-all"),
        pytest.param(lambda l: l.replace("r1", {A: [3, 5, 1]}, {}), (4, 25, 1), id="replace-with-snapshot"),
    ],
)
def test_a_peer_is_subtracted_exactly(h: Harness, how, survivor_load):
    _hello(h, "r1", "r2")
    h.ledger.reserved("r1", A, 10)
    h.ledger.reserved("r1", A, 10)
    h.ledger.reserved("r2", A, 20)

    how(h.ledger)

    assert h.load(A) == survivor_load


def test_a_dropped_peer_counts_again_only_from_its_next_snapshot(h: Harness):
    _hello(h, "r1")
    h.ledger.reserved("r1", A, 10)
    h.ledger.drop("r1")  # its lease ran out while it still served that request

    h.ledger.released("r1", A, 10, False)
    h.ledger.reserved("r1", A, 30)
    assert h.load(A) == (0, 0, 0), "changes on top of nothing would undercount (or go negative)"
    assert not h.ledger.knows("r1")

    h.ledger.replace("r1", {A: [1, 30, 0]}, {})
    h.ledger.released("r1", A, 30, False)
    assert h.load(A) == (0, 0, 0) and h.ledger.knows("r1")


def test_users_active_on_peers_are_summed_and_withdrawn(h: Harness):
    _hello(h, "r1", "r2")
    h.ledger.user_active("r1", UserId("alice"), 2)
    h.ledger.user_active("r2", UserId("alice"), 1)
    assert h.counters.peer_active["alice"] == 3

    h.ledger.user_active("r1", UserId("alice"), 0)
    assert h.counters.peer_active["alice"] == 1
    h.ledger.drop("r2")
    assert h.counters.peer_active["alice"] == 0


def test_releases_and_drops_signal_capacity(h: Harness):
    _hello(h, "r1")
    h.capacity_calls.clear()
    h.ledger.reserved("r1", A, 1)
    assert not h.capacity_calls
    h.ledger.released("r1", A, 1, False)
    h.ledger.reserved("r1", A, 1)
    h.ledger.drop("r1")
    assert len(h.capacity_calls) == 2


def test_load_heard_before_its_pod_is_discovered_is_attached_later(h: Harness):
    _hello(h, "r1")
    late = PodId("http://late")
    h.ledger.reserved("r1", late, 5)

    pod = h.pods.add("http://late")
    h.ledger.attach(h.pods)

    assert (pod.peer.in_flight, pod.peer.pending_prefill) == (1, 5)


def test_replicas_are_the_peers_heard_whole(h: Harness):
    _hello(h, "r1", "r2")
    assert h.ledger.replicas == {"r1", "r2"}
    assert h.ledger.keep_only(["r2"]) == ["r1"]
    assert h.ledger.replicas == {"r2"}
