"""The inbox: what peer replicas sent through the store, applied to this replica's view.

`RedisState` hands it every stream entry it reads (`apply`): a peer's load
and active users go to the `PeerLedger`, its predicted placements to the
prefix index, its charges to the counters. The (re)sync
(`router.state.sync`) hands it what the store holds: the recent placements
(only those, to warm the index up), every peer's snapshot and the summed
counters. Our own entries and snapshot are skipped, and so is whatever does
not decode.

`heard` times every peer's last entry, so that the lease check
(`router.state.lease`) never drops a peer heard from while it looked. Pure
bookkeeping: no I/O, no awaiting.

Not here: reading the stream (`router.state.wire`), the events' wire form
(`router.state.codec`), dropping peers whose lease is gone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Gauge

from router.pods import PodId, UserId
from router.state import codec
from router.state.base import FleetView
from router.state.ledger import PeerLedger

log = logging.getLogger(__name__)


class Inbox:
    """Applies peers' stream entries and stored state to a `FleetView` and a `PeerLedger`.

    Args:
        replica_id: this replica's name in the store (its own entries are skipped).
        view: the pods, prefix index and counters peers' events land in.
        ledger: the peers' load and active users.
        received: counts the peers' events received.
        peers: set to the number of peers held when a snapshot makes one known.
    """

    def __init__(
        self,
        replica_id: str,
        view: FleetView,
        ledger: PeerLedger,
        *,
        received: Counter,
        peers: Gauge,
    ) -> None:
        self.replica_id = replica_id
        self._view = view
        self._ledger = ledger
        self._received = received
        self._peers = peers
        # peer -> when its last stream entry was applied (monotonic), so a lease check never drops a fresher peer
        self.heard: dict[str, float] = {}

    # -- the stream ---------------------------------------------------------------------

    def apply(self, fields: dict) -> None:
        """Apply one stream entry of a peer's."""
        entry = self._entry(fields)
        if entry is None:
            return
        replica, events = entry
        self.heard[replica] = time.monotonic()
        self._received.inc(len(events))
        for event in events:
            try:
                self._apply_one(replica, event)
            except (ValueError, TypeError, IndexError) as exc:
                log.debug("skipped a state event from %s: %s", replica, exc)

    def apply_placements(self, fields: dict) -> None:
        """Insert the placements of one stream entry of a peer's in the index (warm-up), nothing else."""
        entry = self._entry(fields)
        if entry is None:
            return
        for event in entry[1]:
            if event[0] == codec.RESERVED and len(event) == 4:
                with contextlib.suppress(ValueError, TypeError):
                    self._view.index.insert(PodId(event[1]), codec.split_hashes(event[3]))

    def _entry(self, fields: dict) -> tuple[str, list[list[Any]]] | None:
        replica = fields.get(b"r")
        payload = fields.get(b"e")
        if replica is None or payload is None:
            return None
        replica = replica.decode(errors="replace")
        if replica == self.replica_id:
            return None
        try:
            return replica, codec.decode(payload)
        except ValueError as exc:
            log.debug("skipped a state batch from %s: %s", replica, exc)
            return None

    def _apply_one(self, replica: str, event: list[Any]) -> None:
        kind = event[0]
        if kind == codec.RESERVED:
            pod = PodId(event[1])
            self._ledger.reserved(replica, pod, int(event[2]))
            hashes = codec.split_hashes(event[3])
            if hashes:
                # A peer's request that found its prefix on the pod flags it as reused here too.
                index = self._view.index
                index.insert(pod, hashes, reused=index.match(hashes).get(pod, 0))
        elif kind == codec.FIRST_TOKEN:
            self._ledger.first_token(replica, PodId(event[1]), int(event[2]))
        elif kind == codec.RELEASED:
            self._ledger.released(replica, PodId(event[1]), int(event[2]), bool(event[3]))
        elif kind == codec.CHARGED:
            self._view.counters.add(UserId(str(event[1])), float(event[2]))
        elif kind == codec.USER:
            self._ledger.user_active(replica, UserId(str(event[1])), int(event[2]))
        elif kind == codec.SNAPSHOT:
            load, users = codec.check_snapshot(event)
            self._replace(replica, load, users)
            # Only a snapshot makes a peer known (its other events count once it is).
            self._peers.set(len(self._ledger.replicas))

    # -- the stored state, at (re)sync --------------------------------------------------

    def replace_all(self, snapshots: Sequence[Any]) -> None:
        """Hold exactly the peers whose snapshot the store has: `snapshots` is [id, snapshot, id, snapshot, ...]."""
        self._ledger.drop_all()
        for i in range(0, len(snapshots), 2):
            replica = snapshots[i].decode() if isinstance(snapshots[i], bytes) else snapshots[i]
            if replica == self.replica_id or not snapshots[i + 1]:
                continue
            try:
                load, users = codec.decode_snapshot(snapshots[i + 1])
            except ValueError:
                continue
            self._replace(replica, load, users)

    def add_counters(self, vtc: Sequence[bytes]) -> int:
        """Raise our counters to the fleet's sums `vtc` ([user, value, user, value, ...]); returns how many."""
        shared = {UserId(vtc[i].decode()): float(vtc[i + 1]) for i in range(0, len(vtc), 2)}
        mine = self._view.counters.snapshot()
        for user, value in shared.items():
            self._view.counters.add(user, max(value - mine.get(user, 0.0), 0.0))
        return len(shared)

    def _replace(self, replica: str, load: Mapping[str, list[int]], users: Mapping[str, int]) -> None:
        self._ledger.replace(
            replica,
            {PodId(p): row for p, row in load.items()},
            {UserId(u): n for u, n in users.items()},
        )
