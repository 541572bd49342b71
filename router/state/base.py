"""What gateway replicas share about routing, as one small interface.

A gateway decides alone, synchronously, on its own view of the fleet: the
prefix index, every pod's load and every user's virtual token counter. With
several replicas that view must include the others' work, or the replicas
herd onto the same pod, split a prefix's traffic and give each user a fresh
fair share per replica. `RoutingState` is how a replica tells the others what
it did and learns what they did:

- `reserved`: a request was counted on a pod (one more in flight, its
  uncached prompt tokens queued as prefill) and its blocks are predicted on
  that pod;
- `first_token` / `released`: the pod started answering / the request ended;
- `charged` / `activity`: a user's counter grew / a user's request became
  active or ended (the VTC lift on arrival needs the fleet's active users).

Select-and-count stays one step: the replica counts the request on its own
view at once, in the same synchronous step that picks the pod, then calls
`flush()` before the request leaves for the pod, which writes the reservation
to the store's connection (without waiting for the reply), so the store has
it about when the pod sees the request and every other replica one stream
delivery later. Two replicas that decide within that time (about 0.3 ms on
loopback) can still pick the same pod; each then sees the other's
reservation for the next one.

Peers' updates are applied to a `FleetView` (pods, index, counters) that the
gateway hands over when it starts. `LocalState` shares nothing (one replica);
`RedisState` shares through a Redis stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvcache.keys import BlockHash
from router.pods import Pod, PodId, PodSet, UserId


class PlacementSink(Protocol):
    """Where predicted placements learned from peers go (the prefix index)."""

    def insert(self, pod: PodId, hashes: Sequence[BlockHash]) -> None: ...


class CounterSink(Protocol):
    """Where peers' fairness updates go (the VTC counters)."""

    def add(self, user: UserId, cost: float) -> None: ...

    def set_peer_active(self, user: UserId, count: int) -> None: ...

    def snapshot(self) -> dict[UserId, float]: ...


@dataclass(frozen=True, slots=True)
class FleetView:
    """The replica's own state that peers' updates are applied to.

    Attributes:
        pods: the pod table; peers' load lands in each pod's `peer` counts.
        index: the prefix index; peers' predicted placements are inserted.
        counters: the VTC counters; peers' charges are added.
        on_capacity: called when a peer released load (queued requests may fit now).
    """

    pods: PodSet
    index: PlacementSink
    counters: CounterSink
    on_capacity: Callable[[], None]


class RoutingState(Protocol):
    """Routing state shared with other gateway replicas."""

    @property
    def synced(self) -> bool:
        """Warm-up is done (or was given up on): the replica may say it is ready."""
        ...

    async def start(self, view: FleetView) -> None:
        """Begin connecting and warming up in the background; keep applying peers' updates to `view`."""
        ...

    async def stop(self) -> None:
        """Withdraw this replica's load from the shared state and disconnect."""
        ...

    def attach(self, pod: Pod) -> None:
        """Point a newly discovered pod at the peers' load on it."""
        ...

    def reserved(self, pod: PodId, hashes: Sequence[BlockHash], uncached_tokens: int) -> None:
        """A request was counted on `pod` and its blocks predicted there."""
        ...

    def first_token(self, pod: PodId, uncached_tokens: int) -> None:
        """The pod answered: the request's queued prefill is done, it decodes now."""
        ...

    def released(self, pod: PodId, uncached_tokens: int, decoding: bool) -> None:
        """The request ended (served, failed or abandoned)."""
        ...

    def charged(self, user: UserId, cost: float) -> None:
        """`user`'s counter grew by `cost` (weighted tokens)."""
        ...

    def activity(self, user: UserId, active: int) -> None:
        """`user` now has `active` requests queued or in flight on this replica."""
        ...

    async def flush(self) -> None:
        """Return once everything recorded so far is on its way to the peers (or the store is down).

        "On its way": written to the store's connection, in order; the store's
        reply is not awaited, so a request pays no round trip for it.
        """
        ...

    async def settle(self) -> None:
        """`flush()`, then, if other replicas read this state, wait until the store has it.

        For the end of an answer: a client's next request may go to another
        replica at once, which must not still count this request on its pod.
        The wait is one store round trip, bounded by `flush_timeout_s`; a
        store that does not answer in time is not waited for further.
        """
        ...
