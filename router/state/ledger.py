"""The peers' ledger: every other replica's load per pod and active users, as last heard.

`Inbox` feeds it the peers' events; it keeps each peer's contribution
apart, so that a peer that restarts (and sends a fresh snapshot), dies (its
lease expires) or is cut off (the store went away) can be subtracted exactly,
leaving no load behind for ever. A peer's changes count only on top of a
whole state heard from it (a snapshot): once it is dropped, its changes are
ignored until it sends a snapshot again, so a peer dropped while still alive
never turns into negative load. The sums per pod live in one `PeerLoad` per
pod, which the pod table's `Pod.peer` points at, so policies read the fleet's
load with no lookup. Pure bookkeeping: no I/O, no awaiting.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from router.pods import PeerLoad, PodId, PodSet, UserId
from router.state.base import FleetView


class PeerLedger:
    """Load and user activity of every peer replica, applied to a `FleetView`."""

    def __init__(self, view: FleetView) -> None:
        self._view = view
        # replica -> pod -> [in_flight, pending_prefill, decoding]
        self._load: dict[str, dict[PodId, list[int]]] = {}
        # replica -> user -> active requests
        self._users: dict[str, dict[UserId, int]] = {}
        self._totals: dict[PodId, PeerLoad] = {}
        self._user_totals: defaultdict[UserId, int] = defaultdict(int)
        # replicas whose whole state was heard (a snapshot) and not dropped since
        self._known: set[str] = set()

    @property
    def replicas(self) -> frozenset[str]:
        """Peers whose state is held: heard whole (a snapshot) and not dropped since."""
        return frozenset(self._known)

    @property
    def any(self) -> bool:
        """Whether the state of any peer is held."""
        return bool(self._known)

    def knows(self, replica: str) -> bool:
        """Whether `replica`'s changes count (its whole state was heard and it was not dropped since)."""
        return replica in self._known

    def total(self, pod: PodId) -> PeerLoad:
        """The peers' summed load on `pod` (attached to the pod when it is in the table)."""
        load = self._totals.get(pod)
        if load is None:
            load = self._totals[pod] = PeerLoad()
        return load

    def attach(self, pods: PodSet) -> None:
        """Point every pod of the table at its peers' totals (new pods included)."""
        for pod in pods:
            pod.peer = self.total(pod.id)

    def reserved(self, replica: str, pod: PodId, uncached: int) -> None:
        if replica in self._known:
            self._add(replica, pod, 1, uncached, 0)

    def first_token(self, replica: str, pod: PodId, uncached: int) -> None:
        if replica in self._known:
            self._add(replica, pod, 0, -uncached, 1)

    def released(self, replica: str, pod: PodId, uncached: int, decoding: bool) -> None:
        if replica not in self._known:
            return
        if decoding:
            self._add(replica, pod, -1, 0, -1)
        else:
            self._add(replica, pod, -1, -uncached, 0)
        self._view.on_capacity()

    def user_active(self, replica: str, user: UserId, active: int) -> None:
        if replica not in self._known:
            return
        users = self._users.setdefault(replica, {})
        before = users.get(user, 0)
        if active > 0:
            users[user] = active
        else:
            users.pop(user, None)
        self._set_user_total(user, self._user_totals[user] + active - before)

    def replace(self, replica: str, load: Mapping[PodId, Sequence[int]], users: Mapping[UserId, int]) -> None:
        """Take `replica`'s whole state from a snapshot, replacing what was heard before."""
        self.drop(replica, notify=False)
        self._known.add(replica)
        for pod, (in_flight, pending, decoding) in load.items():
            self._add(replica, pod, in_flight, pending, decoding)
        for user, active in users.items():
            self.user_active(replica, user, active)
        self._view.on_capacity()

    def drop(self, replica: str, *, notify: bool = True) -> bool:
        """Forget `replica` (left, died or unreachable) until its next snapshot. Returns whether anything was held."""
        self._known.discard(replica)
        load = self._load.pop(replica, None)
        users = self._users.pop(replica, None)
        for pod, (in_flight, pending, decoding) in (load or {}).items():
            total = self.total(pod)
            total.in_flight -= in_flight
            total.pending_prefill -= pending
            total.decoding -= decoding
            self._touch(pod)
        for user, active in (users or {}).items():
            self._set_user_total(user, self._user_totals[user] - active)
        if notify and (load or users):
            self._view.on_capacity()
        return bool(load or users)

    def drop_all(self) -> None:
        for replica in list(self.replicas):
            self.drop(replica)

    def keep_only(self, alive: Iterable[str]) -> list[str]:
        """Drop every replica not in `alive`. Returns the dropped ones."""
        keep = set(alive)
        gone = [r for r in self.replicas if r not in keep]
        for replica in gone:
            self.drop(replica)
        return gone

    def _add(self, replica: str, pod: PodId, in_flight: int, pending: int, decoding: int) -> None:
        row = self._load.setdefault(replica, {}).get(pod)
        if row is None:
            row = self._load[replica][pod] = [0, 0, 0]
        total = self.total(pod)
        live = self._view.pods.get(pod)
        if live is not None and live.peer is not total:
            live.peer = total  # a pod discovered after its peers' load was heard
        row[0] += in_flight
        row[1] += pending
        row[2] += decoding
        total.in_flight += in_flight
        total.pending_prefill += pending
        total.decoding += decoding
        if live is not None:
            live.touch()  # the counts changed in place: re-order the pod by load
        if row == [0, 0, 0]:
            del self._load[replica][pod]

    def _touch(self, pod: PodId) -> None:
        live = self._view.pods.get(pod)
        if live is not None:
            live.touch()

    def _set_user_total(self, user: UserId, total: int) -> None:
        if total > 0:
            self._user_totals[user] = total
        else:
            self._user_totals.pop(user, None)
            total = 0
        self._view.counters.set_peer_active(user, total)
