"""`RedisState`: gateway replicas share routing state through one Redis stream.

Here: what this replica did, batched into its outbox and written through its
write link, and the life cycle that ties the parts together (start, falling
back while the store is down, (re)sync, stop).

Why a Redis stream: Redis is already on every machine kvgate runs beside (L3,
cache-node membership), a stream delivers in order and can be replayed (a
replica that starts reads back the recent placements), and a transaction can
append to it and write the replica's snapshot in one atomic step, so a
snapshot is always consistent with a stream position. Measured on loopback
(median of 2,000): XADD round trip 0.19 ms, stream delivery to a blocked
reader 0.15 ms; Redis pub/sub 0.10 / 0.11 ms and NATS 0.16 / 0.16 ms, neither
of which can replay.

Keys, under `kvgate:{cluster}:`:

    events              the stream: one entry per flushed batch {r: replica, e: events}
    replica:{id}        the replica's snapshot, with a lease (PX lease_s)
    replicas            the set of replica ids that have written
    vtc                 hash user -> virtual token counter, fleet-wide

What is shared and how fresh (see `router.state.base` for the interface):

- predicted placements and per-pod load: on the stream, in the batch that the
  request's `flush()` writes to the store's connection before the request
  leaves for the pod;
- engine-confirmed cache contents: not here; every replica subscribes to
  every engine's KV events;
- VTC counters: charges on the stream and summed in `vtc`; active users on the
  stream, so the lift on arrival uses the fleet's active users.

Faults: a store that is down or fails makes the replica fall back to its own
state at once (peers' load is forgotten, `kvgate_state_store_up` 0, one log
line per outage, `kvgate_state_fallbacks_total`); it reconnects with backoff,
reads everything back (`router.state.sync`) and sends its own snapshot,
which replaces what peers held of it. A replica that dies, or whose lease key
was gone: `router.state.lease`. A store that stops reading (the socket's
buffers full for `flush_timeout_s`) or answering (`lease_s`) counts as down.

Writes (`router.state.wire`): a request's `flush()` writes everything
recorded since the last write as one batch, in the request's own step, and
does not wait for the store's reply, so sharing adds no round trip to a
request. Redis executes one connection's commands in order: the batch is in
the store about when the pod sees the request, and peers hear of it one
stream delivery later (about 0.15 ms on loopback). Every other event (first
token, release, counters, active users) waits up to `batch_linger_s` to go
with the next request's batch, or alone when no request comes, so a replica
under load writes about one stream entry per request, and fewer when
requests arrive together.

The end of an answer is the one write a request waits for (`settle()`,
called by `Lease.finish` before the client can see the end): the client's
next request may go to a peer at once, and a peer that still counted the
finished request on its pod would price its prefill as queued there (a
whole answer's first token comes with its last) and send the client's prefix
to another pod. The wait is one store round trip, at most
`flush_timeout_s`, and only with peers. Peers still apply the release one
stream delivery after the store has it.

NOTE: a release without an answer (a failure, a client gone) reaches the
peers on the next loop step: meanwhile they count the pod one request busier
than it is (they err towards other pods, never overfill it). A user's
counter and activity are late by up to `batch_linger_s`, a fairness error of
one request's cost at most.

Not here: applying peers' entries (`router.state.inbox`), the lease loop
(`router.state.lease`), the read back at (re)sync (`router.state.sync`), the
choice of pod (the router decides on the merged view), the engines' KV
events, the admission queue (each replica queues its own requests, ordered
by the fleet-wide counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvcache.keys import BlockHash
from router.pods import Pod, PodId, UserId
from router.settings import StateSettings
from router.state import codec
from router.state.base import FleetView
from router.state.inbox import Inbox
from router.state.lease import LeaseKeeper
from router.state.ledger import PeerLedger
from router.state.sync import read_back
from router.state.wire import STORE_ERRORS, StoreWriter, StreamFollower

log = logging.getLogger(__name__)

#: Seconds `stop()` keeps cancelling loops that swallowed their cancellation.
_STOP_GRACE_S = 5.0


class StateMetrics:
    """Metrics of the shared state, on the gateway's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("kvgate_state_store_up", "1 while the shared routing state store answers.", registry=registry)
        self.fallbacks = Counter(
            "kvgate_state_fallbacks", "Times the replica fell back to its own routing state (store down).", registry=registry
        )
        self.flush_seconds = Histogram(
            "kvgate_state_flush_seconds",
            "Time from writing a batch of state events to the store's reply (only an answer's end waits for it).",
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1),
            registry=registry,
        )
        self.flush_timeouts = Counter(
            "kvgate_state_flush_timeouts", "Writes the store did not take within flush_timeout_s (it then counts as down).", registry=registry
        )
        self.events = Counter("kvgate_state_events", "State events sent and received.", ["direction"], registry=registry)
        self.peers = Gauge("kvgate_state_peers", "Other gateway replicas whose state this one holds.", registry=registry)


class RedisState:
    """Routing state shared with other replicas through Redis.

    Args:
        settings: the URL, lease and timeouts.
        registry: where to export the state's metrics.
        replica_id: this replica's name in the store (random when None).
    """

    def __init__(self, settings: StateSettings, *, registry: CollectorRegistry, replica_id: str | None = None) -> None:
        assert settings.url is not None
        self.settings = settings
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.metrics = StateMetrics(registry)
        prefix = f"kvgate:{settings.cluster}:"
        self._stream = prefix + "events"
        self._snapshots = prefix + "replica:"
        self._replicas = prefix + "replicas"
        self._vtc = prefix + "vtc"
        self._lease_ms = max(int(settings.lease_s * 1000), 100)
        block_s = min(settings.lease_s / 3, 1.0)
        self._block_ms = max(int(block_s * 1000), 10)
        self._timeout_s = settings.lease_s + block_s
        self._client = aioredis.Redis.from_url(settings.url, socket_timeout=self._timeout_s, socket_connect_timeout=settings.lease_s)
        self._follower = StreamFollower(
            settings.url, self._stream, block_ms=self._block_ms, count=1000, connect_timeout_s=settings.lease_s
        )
        # the connection batches are written on; a fresh one after each (re)connect
        self._link: StoreWriter | None = None
        self._ledger: PeerLedger | None = None
        self._inbox: Inbox | None = None
        self._own: dict[PodId, list[int]] = {}
        self._own_users: dict[UserId, int] = {}
        self._outbox: list[list[Any]] = []
        self._charges: dict[UserId, float] = {}
        # when the events waiting in the outbox are written without a request's flush
        self._due: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._up = False
        self._synced = asyncio.Event()
        self._last_id: str | bytes = "0-0"
        self._tasks: list[asyncio.Task] = []
        self._sent = self.metrics.events.labels("sent")
        self._received = self.metrics.events.labels("received")

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def up(self) -> bool:
        return self._up

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, view: FleetView) -> None:
        """Start syncing in the background; `synced` turns true once warmed up (or given up on)."""
        self._ledger = PeerLedger(view)
        self._ledger.attach(view.pods)
        self._inbox = Inbox(self.replica_id, view, self._ledger, received=self._received, peers=self.metrics.peers)
        lease = LeaseKeeper(
            self._client,
            self._ledger,
            self._inbox.heard,
            replica_id=self.replica_id,
            snapshots=self._snapshots,
            replicas=self._replicas,
            lease_ms=self._lease_ms,
            interval_s=self.settings.lease_s / 3,
            peers=self.metrics.peers,
            up=lambda: self._up,
            on_lost=self._announce,
            on_failure=self._down,
        )
        self.metrics.up.set(0)
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="state reader"),
            asyncio.create_task(self._write_loop(), name="state writer"),
            asyncio.create_task(lease.run(), name="state lease"),
            asyncio.create_task(self._warmup_deadline(), name="state warm-up"),
        ]

    def attach(self, pod: Pod) -> None:
        if self._ledger is not None:
            pod.peer = self._ledger.total(pod.id)

    async def _warmup_deadline(self) -> None:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout=self.settings.warmup_timeout_s)
        except asyncio.TimeoutError:
            log.warning("shared routing state at %s did not answer in %gs; routing on this replica's own state until it does",
                        self.settings.url, self.settings.warmup_timeout_s)
            self._synced.set()

    async def stop(self) -> None:
        await self._cancel_loops()
        self._disarm()
        link = self._link
        if self._up and link is not None:
            # Leave at once rather than when the lease runs out: peers drop our load now. The
            # empty snapshot goes on the link, after every batch already sent, so none lands later.
            self._own.clear()
            self._own_users.clear()
            self._outbox.append(codec.snapshot({}, {}))
            await self._write()
            if self._up and await link.settle(self.settings.lease_s):
                with contextlib.suppress(*STORE_ERRORS):
                    pipe = self._client.pipeline(transaction=True)
                    pipe.delete(self._snapshots + self.replica_id)
                    pipe.srem(self._replicas, self.replica_id)
                    await asyncio.wait_for(pipe.execute(), timeout=self.settings.lease_s)
        self._up = False
        if link is not None:
            await link.close()
        self._link = None
        await self._client.aclose()
        await self._follower.close()

    async def _cancel_loops(self) -> None:
        """Cancel the loops and wait until they ended, cancelling again any that swallowed it.

        NOTE: a blocking XREAD cancelled just as its read timeout fires can
        swallow the cancellation (redis-py's read under `asyncio.timeout`) and
        block again; awaiting it once would hang the gateway's shutdown.
        """
        pending = set(self._tasks)
        deadline = time.monotonic() + _STOP_GRACE_S
        while pending and time.monotonic() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        if pending:
            log.warning("shared routing state: %d loops did not stop", len(pending))
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("shared routing state: %s had failed: %r", task.get_name(), task.exception())
        self._tasks.clear()

    # -- what this replica did ----------------------------------------------------------------

    def reserved(self, pod: PodId, hashes: Sequence[BlockHash], uncached_tokens: int) -> None:
        self._own_add(pod, 1, uncached_tokens, 0)
        self._send([codec.RESERVED, pod, uncached_tokens, codec.join_hashes(hashes)])

    def first_token(self, pod: PodId, uncached_tokens: int) -> None:
        self._own_add(pod, 0, -uncached_tokens, 1)
        self._send([codec.FIRST_TOKEN, pod, uncached_tokens])

    def released(self, pod: PodId, uncached_tokens: int, decoding: bool) -> None:
        if decoding:
            self._own_add(pod, -1, 0, -1)
        else:
            self._own_add(pod, -1, -uncached_tokens, 0)
        # Soon rather than lingering when there are peers: one about to pick a pod must not see it
        # busier than it is (it would send a prefix the pod holds elsewhere). An answer's end
        # waits for the store to have it (`Lease.finish`); a release without an answer (a failure,
        # a client gone) goes on the next loop step. Without peers it waits for the next request's write.
        self._send([codec.RELEASED, pod, uncached_tokens, decoding], soon=self._ledger is not None and self._ledger.any)

    def charged(self, user: UserId, cost: float) -> None:
        if not self._up:
            return
        self._charges[user] = self._charges.get(user, 0.0) + cost
        self._send([codec.CHARGED, user, cost])

    def activity(self, user: UserId, active: int) -> None:
        if active > 0:
            self._own_users[user] = active
        else:
            self._own_users.pop(user, None)
        self._send([codec.USER, user, active])

    async def flush(self) -> None:
        """Write everything recorded so far to the store's connection; the store's reply is not awaited."""
        if self._up and self._outbox:
            await self._write()

    async def settle(self) -> None:
        await self.flush()
        link = self._link
        if self._up and link is not None and self._ledger is not None and self._ledger.any:
            await link.settle(self.settings.flush_timeout_s)

    def _own_add(self, pod: PodId, in_flight: int, pending: int, decoding: int) -> None:
        row = self._own.setdefault(pod, [0, 0, 0])
        row[0] += in_flight
        row[1] += pending
        row[2] += decoding
        if row == [0, 0, 0]:
            del self._own[pod]

    def _send(self, event: list[Any], *, soon: bool = False) -> None:
        """Queue `event` for the next write: a request's flush, or `batch_linger_s` from now at the latest.

        With `soon`, the next write is as soon as the event loop is free (after
        the current step, which may be handing an answer to its client).
        """
        if self._up:
            self._outbox.append(event)
            if soon:
                self._wake.set()
            elif self._due is None:
                self._due = asyncio.get_running_loop().call_later(self.settings.batch_linger_s, self._wake.set)

    def _disarm(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None

    # -- the loops -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Write what no request's flush took along (lingering events, a snapshot sent again)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._up and self._outbox:
                await self._write()

    async def _write(self) -> None:
        """Send the outbox as one batch, with our snapshot and the counters' increments."""
        self._disarm()
        link = self._link
        if link is None or not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        charges, self._charges = self._charges, {}
        args: list[Any] = [
            self.replica_id,
            codec.encode(batch),
            codec.encode(codec.snapshot(self._own, self._own_users)),
            self._lease_ms,
            self.settings.stream_max_entries,
        ]
        for user, cost in charges.items():
            args += (user, cost)
        try:
            async with asyncio.timeout(self.settings.flush_timeout_s):
                await link.send(args, tag=batch[0][0] == codec.SNAPSHOT)
        except TimeoutError as exc:
            self.metrics.flush_timeouts.inc()
            self._down(exc)
        except STORE_ERRORS as exc:
            self._down(exc)
        else:
            self._sent.inc(len(batch))

    def _replied(self, whole: bool, had_lease: bool, seconds: float) -> None:
        self.metrics.flush_seconds.observe(seconds)
        if not had_lease and not whole:
            self._announce("its lease key was gone")

    def _announce(self, why: str) -> None:
        """Send our whole state next: peers may have dropped us (and ignore our changes until they have it)."""
        if not self._up:
            return
        log.info("shared routing state: sending this replica's whole state again (%s)", why)
        self._outbox.insert(0, codec.snapshot(self._own, self._own_users))
        self._wake.set()

    def _open_link(self) -> StoreWriter:
        link: StoreWriter

        def replied(whole: bool, had_lease: bool, seconds: float) -> None:
            if self._link is link:
                self._replied(whole, had_lease, seconds)

        def failed(exc: BaseException) -> None:
            if self._link is link:
                self._down(exc)

        link = StoreWriter(
            self.settings.url or "",
            (self._stream, self._snapshots + self.replica_id, self._replicas, self._vtc),
            connect_timeout_s=self.settings.lease_s,
            reply_timeout_s=self._timeout_s,
            on_reply=replied,
            on_failure=failed,
        )
        return link

    async def _read_loop(self) -> None:
        inbox = self._inbox
        assert inbox is not None
        backoff = 0.05
        while True:
            try:
                if not self._up:
                    await self._sync()
                    backoff = 0.05
                for entry_id, fields in await self._follower.read(self._last_id):
                    self._last_id = entry_id
                    inbox.apply(fields)
            except STORE_ERRORS as exc:
                self._down(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.lease_s)

    # -- up and down ----------------------------------------------------------------------

    async def _sync(self) -> None:
        """Read the fleet's state back (at start and after an outage) and send ours."""
        assert self._inbox is not None and self._ledger is not None
        if self._link is not None:
            await self._link.close()
            self._link = None
        link = self._open_link()
        try:
            await link.open()
        except BaseException:
            await link.close()
            raise
        self._link = link
        last_id, counters = await read_back(
            self._client,
            self._inbox,
            stream=self._stream,
            snapshots=self._snapshots,
            replicas=self._replicas,
            vtc=self._vtc,
            warmup_entries=self.settings.warmup_entries,
        )
        self._last_id = last_id
        self._up = True
        self.metrics.up.set(1)
        self.metrics.peers.set(len(self._ledger.replicas))
        # Peers replace whatever they held of us with our state as it is now.
        self._outbox = [codec.snapshot(self._own, self._own_users)]
        await self._write()
        if not self._synced.is_set():
            log.info("shared routing state: %d peer replicas, %d counters", len(self._ledger.replicas), counters)
        else:
            log.info("shared routing state is back; resynced with %d peer replicas", len(self._ledger.replicas))
        self._synced.set()

    def _down(self, exc: BaseException) -> None:
        if self._up:
            log.warning("shared routing state at %s failed (%s); routing on this replica's own state until it is back",
                        self.settings.url, exc)
            self.metrics.fallbacks.inc()
        self._up = False
        self.metrics.up.set(0)
        self._outbox.clear()
        self._charges.clear()
        self._disarm()
        if self._ledger is not None:
            self._ledger.drop_all()
            self.metrics.peers.set(0)
