"""Orderings of the fleet by load, kept current as load changes, so a decision need not visit every pod.

A routing decision used to price every healthy pod: about 0.6 µs a pod, so
0.6 ms a decision at 1,000 pods. Instead, a policy that can (see
`Policy.shortlist` in `router.policies.base`) names one or more load keys
(a function of a pod alone, never of the request), and `FleetOrder` keeps the
healthy pods sorted by each key in a `sortedcontainers.SortedList`. The
policy then prices the pods holding a prefix of the request and walks the
orderings from their cheap ends until no unvisited pod can beat the best
found, so a decision prices the holders and a few of the least loaded pods,
not the fleet.

Keeping the orderings current: every pod of the `PodSet` reports assignments
to the fields routing reads (counts, health, models, scraped figures, the
peers' load object; see `router.pods`), the peers' ledger touches a pod when
it changes its peers' counts in place, and the monitor touches a pod whose
index entries it drops or resizes (the router's own accounting on a pod is an
assignment, so recording blocks on a pod re-keys it too). Reports only mark the pod dirty (a set insert);
`sync()`, called at the start of each decision, re-keys the dirty pods at
O(log n) each, so a burst of changes to one pod between two decisions costs
one re-key.

What is exact, per policy (proved in each policy's `shortlist`):
  - `least-request`: the least loaded eligible pod, exactly.
  - `kv-aware`: the argmin of the full scan's cost, exactly, as long as the
    prefix index's eviction price of a pod has not fallen since it was last
    re-keyed (see below) and the walk stays within its visit cap.
  - ties: the full scan breaks a tie of equal cost by fewest in flight, then
    at random over the whole fleet; the shortlist keeps walking through
    equal-cost pods (the orderings put fewer in flight first) up to
    `TIE_CAP` of them and draws among those. An idle fleet, where every pod
    costs the same, therefore spreads over the pods at the head of the
    ordering, which move back as they take work.

What is approximate:
  - the eviction price (`PrefixIndex.eviction_price`) changes with the engines' KV events
    without telling the pods; the ordering reads it when a pod is re-keyed
    (each decision on it, each lease step, each scrape). A rise only makes
    the walk visit a pod early, which is safe; a fall (the engine evicted
    blocks) can leave a pod ranked later than it should be until its next
    re-key, at most one scrape interval.
  - a walk that reaches `MAX_VISITS` pods stops with the best so far; that
    takes many pods of nearly equal cost, among which the choice is nearly
    equal too.

Not here: the costs themselves (`router.policies`), admission (`router.routing`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence

from sortedcontainers import SortedList

from router.pods import Pod, PodId, PodSet

#: A pod's position in one ordering: (key, own in flight, join order, pod).
Entry = tuple[float, int, int, Pod]
LoadKey = Callable[[Pod], float]

#: Equal-cost pods a walk collects before it stops (the full scan draws among all of them).
TIE_CAP = 8
#: Pods a walk visits at most before it settles for the best so far (once it has one).
MAX_VISITS = 512


class _Ordering:
    """The healthy pods of the table sorted by one load key."""

    __slots__ = ("key", "sorted", "entries")

    def __init__(self, key: LoadKey) -> None:
        self.key = key
        self.sorted: SortedList = SortedList()
        self.entries: dict[Pod, Entry] = {}

    def place(self, pod: Pod, seq: int, member: bool) -> None:
        entry = (self.key(pod), pod.in_flight, seq, pod) if member else None
        old = self.entries.get(pod)
        if old is not None:
            if entry is not None and old[:2] == entry[:2]:
                return  # the change did not move it
            del self.entries[pod]
            self.sorted.remove(old)
        if entry is not None:
            self.entries[pod] = entry
            self.sorted.add(entry)


class FleetOrder:
    """Healthy pods sorted by the load keys policies ask for, re-keyed lazily.

    Args:
        pods: the pod table; the order watches it (`PodSet.watch`).
        occupancy: pod -> the prefix index's price of caching one more block
            there (`PrefixIndex.eviction_price`, 0..2); all zero when None.
    """

    def __init__(self, pods: PodSet, occupancy: Callable[[PodId], float] | None = None) -> None:
        self.pods = pods
        self._occupancy = occupancy or (lambda pod_id: 0.0)
        self._orderings: dict[str, _Ordering] = {}
        self._seq: dict[Pod, int] = {}
        self._counter = itertools.count()
        self._dirty: set[Pod] = set()
        pods.watch(self.touch)

    def touch(self, pod: Pod) -> None:
        """Mark `pod` for re-keying at the next `sync` (something its keys read changed)."""
        if self._orderings:  # nothing to keep current until a policy asks for an ordering
            self._dirty.add(pod)

    def ordering(self, name: str, key: LoadKey) -> SortedList:
        """The healthy pods sorted by `key`, as `(key, in_flight, seq, pod)` entries, cheapest first.

        The first call for a name builds the ordering over the whole table
        (O(n log n)); later calls return it, current as of the last `sync`.

        Args:
            name: the ordering's name; the same name must always come with the same key.
            key: the pod's load, lower first; must read only the pod (and
                state that reports changes to it).
        """
        ordering = self._orderings.get(name)
        if ordering is None:
            self.sync()
            ordering = self._orderings[name] = _Ordering(key)
            for pod in self.pods:
                ordering.place(pod, self._seq_of(pod), pod.healthy)
        return ordering.sorted

    def occupancy(self, pod: PodId) -> float:
        """The prefix index's eviction price of `pod` (0..2), as orderings may read it."""
        return self._occupancy(pod)

    def sync(self) -> None:
        """Re-key every pod marked since the last call, in every ordering. O(dirty x log n)."""
        if not self._dirty:
            return
        dirty = list(self._dirty)
        self._dirty.clear()
        for pod in dirty:
            member = pod.healthy and self.pods.get(pod.id) is pod
            if not member and pod not in self._seq:
                continue
            seq = self._seq_of(pod)
            for ordering in self._orderings.values():
                ordering.place(pod, seq, member)
            if self.pods.get(pod.id) is not pod:
                del self._seq[pod]

    def walk(self, names: Sequence[str]) -> Iterator[tuple[int, float, Pod]]:
        """Visit the named orderings cheapest first, taking one entry from each in turn.

        Args:
            names: orderings already built with `ordering`.

        Yields:
            (which ordering, the entry's key, the pod). A pod may come once from each ordering.
        """
        iterators = [iter(self._orderings[name].sorted) for name in names]
        while iterators:
            for which, entries in enumerate(iterators):
                entry = next(entries, None)
                if entry is None:
                    return  # one ordering is exhausted: every pod has been visited
                yield which, entry[0], entry[3]

    def _seq_of(self, pod: Pod) -> int:
        seq = self._seq.get(pod)
        if seq is None:
            seq = self._seq[pod] = next(self._counter)
        return seq


class IndexOccupancy(Mapping[PodId, float]):
    """`RouteRequest.occupancy` read live from the prefix index, instead of a copy per pod per request.

    Args:
        occupancy: `PrefixIndex.eviction_price`.
        pods: the pod table (what iterating the mapping lists).
    """

    def __init__(self, occupancy: Callable[[PodId], float], pods: PodSet) -> None:
        self._occupancy = occupancy
        self.pods = pods

    def __getitem__(self, pod: PodId) -> float:
        if self.pods.get(pod) is None:
            raise KeyError(pod)
        return self._occupancy(pod)

    def get(self, pod: PodId, default: float | None = None) -> float | None:  # type: ignore[override]
        return self._occupancy(pod) if self.pods.get(pod) is not None else default

    def __iter__(self) -> Iterator[PodId]:
        return (pod.id for pod in self.pods)

    def __len__(self) -> int:
        return len(self.pods)
