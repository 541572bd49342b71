"""The lease loop: this replica's lease renewed, and peers whose lease is gone dropped.

Every replica's snapshot key (`replica:{id}`) carries a lease (PX lease_s).
The loop only renews the key's expiry: the key's content is written in the
transaction that appends to the stream (`router.state.wire`), so it always
matches a stream position (a starting replica reads both in one step).

A replica that dies stops renewing its lease; the others drop its load when
the lease key is gone (within `lease_s` plus one check) and it was not heard
from since the check began. A replica whose lease key was gone (dropped by
the others while still alive: it was slow, or the key was lost) sends its
whole state again on the stream, and the others ignore its changes until
they have it (`PeerLedger`).

Not here: sending the whole state again (`RedisState`, told through
`on_lost`; a write's reply can tell it too), what a failing store means
(`on_failure`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from prometheus_client import Gauge

from router.state.ledger import PeerLedger
from router.state.wire import STORE_ERRORS

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews this replica's lease every `interval_s` while the store is up, and drops the peers whose lease is gone.

    Args:
        client: the store.
        ledger: the peers' load; peers found gone are dropped from it.
        heard: peer -> when its last stream entry was applied (monotonic, `Inbox.heard`).
        replica_id: this replica's name in the store.
        snapshots: the prefix of the replicas' snapshot (lease) keys.
        replicas: the key of the set of replica ids.
        lease_ms: the lease a renewal gives.
        interval_s: the time between two checks.
        peers: set to the number of peers held after each check.
        up: whether the store is up (no check while it is not).
        on_lost: told why, when this replica's own lease key was gone.
        on_failure: told the store's error.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        ledger: PeerLedger,
        heard: dict[str, float],
        *,
        replica_id: str,
        snapshots: str,
        replicas: str,
        lease_ms: int,
        interval_s: float,
        peers: Gauge,
        up: Callable[[], bool],
        on_lost: Callable[[str], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._heard = heard
        self._replica_id = replica_id
        self._snapshots = snapshots
        self._replicas = replicas
        self._lease_ms = lease_ms
        self._interval_s = interval_s
        self._peers = peers
        self._up = up
        self._on_lost = on_lost
        self._on_failure = on_failure

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if not self._up():
                continue
            try:
                await self._check()
            except STORE_ERRORS as exc:
                self._on_failure(exc)

    async def _check(self) -> None:
        checked = time.monotonic()
        if not await self._client.pexpire(self._snapshots + self._replica_id, self._lease_ms):
            self._on_lost("its lease had expired")
        members = [m.decode() if isinstance(m, bytes) else m for m in await self._client.smembers(self._replicas)]
        others = [m for m in members if m != self._replica_id]
        alive = []
        if others:
            pipe = self._client.pipeline(transaction=False)
            for member in others:
                pipe.exists(self._snapshots + member)
            for member, exists in zip(others, await pipe.execute()):
                if exists:
                    alive.append(member)
                else:
                    await self._client.srem(self._replicas, member)
        # A peer heard from since the check began is alive, whatever the check saw.
        alive += [r for r, at in self._heard.items() if at >= checked]
        for gone in self._ledger.keep_only(alive):
            self._heard.pop(gone, None)
            log.info("gateway replica %s stopped renewing its lease; dropped its load", gone)
        self._peers.set(len(self._ledger.replicas))
