"""L2: blocks on a ring of cache nodes, reached over gRPC and their data ports.

Frames travel over each node's framed data port when it serves one
(`kvcache.datapath`, through `kvcache.client.NodeClient`), over gRPC
otherwise; control calls (which keys a node holds, its fill level, where its
data port is) are gRPC.

Placement: `kvcache.ring.Ring` over the current members (from a
`kvcache.membership` source, re-read every `refresh_s`). A block is written to
its owner and to `replicas - 1` more nodes on other zones or hosts. Reads ask
the placement nodes in order and then `read_fallback` more successive ring
nodes, which still hold a block for a while after a node joins and takes over
its keys; the first good frame wins, a corrupt one is a counted miss at that
node.

Failures: a node that fails a call (a retryable error: unreachable, timed
out, leaving) is suspected for `suspect_s` and left out of the ring meanwhile,
so its keys fall to the next nodes (its share of reads become misses, nothing
else). Only when every node is suspected does a call raise `TierUnavailable`;
the tiered store then skips L2 for a while. A node that refuses a request for
good (`TierRejected`: a block over its limit, a malformed answer) is not
suspected: that request's blocks are dropped or missed and counted, and when
refusals are all a call got it raises `TierRejected`, which leaves L2 in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

from kvcache.client import DEFAULT_MAX_MESSAGE_BYTES, NodeClient
from kvcache.errors import CorruptBlock, TierError, TierRejected, TierUnavailable
from kvcache.framing import Buffer, corruption_reason, open_frame
from kvcache.keys import BlockKey
from kvcache.membership.base import Membership
from kvcache.metrics import StoreMetrics
from kvcache.ring import DEFAULT_VNODES, NodeId, NodeInfo, Ring
from kvcache.tiers.base import HitSource, Usage

log = logging.getLogger(__name__)


class PeerTier:
    """The L2 client: a consistent-hashed, replicated view of the cache nodes.

    Args:
        membership: where the members are listed.
        replicas: copies of each block (owner included).
        read_fallback: extra ring nodes asked on a miss, beyond the placement.
        vnodes: ring points per node (must match the nodes').
        timeout_s: deadline of each RPC.
        max_message_bytes: gRPC message cap (must not exceed the nodes').
        refresh_s: how often the member list is re-read.
        suspect_s: how long a failed node is left out of the ring.
        token: sent to the nodes with every call (`kvcache.auth`).
        tls_ca_file: PEM roots to verify the nodes' certificates (empty:
            plain TCP).
        tls_server_name: name the nodes' certificates carry, when it is not
            the host of their address.
        data_plane: move frames over the nodes' data ports when they serve
            one (never with TLS); off: gRPC for everything.
        name: metric label.
        metrics: where to count corrupt frames and node failures.
        clock: monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        membership: Membership,
        *,
        replicas: int = 1,
        read_fallback: int = 1,
        vnodes: int = DEFAULT_VNODES,
        timeout_s: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        refresh_s: float = 2.0,
        suspect_s: float = 2.0,
        token: str = "",
        tls_ca_file: str = "",
        tls_server_name: str = "",
        data_plane: bool = True,
        name: str = "l2",
        metrics: StoreMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._membership = membership
        self._replicas = max(1, replicas)
        self._fallback = max(0, read_fallback)
        self._vnodes = vnodes
        self._timeout = timeout_s
        self._max_message = max_message_bytes
        self._refresh_s = refresh_s
        self._suspect_s = suspect_s
        self._token = token
        self._tls_ca_file = tls_ca_file
        self._tls_server_name = tls_server_name
        self._data_plane = data_plane
        self._name = name
        self._metrics = metrics
        self._clock = clock
        self._members: Ring = Ring((), vnodes=vnodes)
        self._ring: Ring = self._members
        self._suspects: dict[NodeId, float] = {}
        self._clients: dict[str, NodeClient] = {}
        self._refresher: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def source(self) -> HitSource:
        return "p2p"

    @property
    def ring(self) -> Ring:
        """The ring in use: members minus currently suspected nodes."""
        self._expire_suspects()
        return self._ring

    async def start(self) -> None:
        """Read the members and keep re-reading them every `refresh_s`.

        Raises:
            TierUnavailable: the first read failed (re-reading goes on).
        """
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever(), name=f"{self._name}-membership")
            await self.refresh()

    async def refresh(self) -> None:
        """Re-read the members now and rebuild the ring.

        Raises:
            TierUnavailable: the membership source cannot be read.
        """
        members = await self._membership.members()
        if set(members) != set(self._members.nodes.values()):
            self._members = Ring(members, vnodes=self._vnodes)
            self._rebuild()
            log.info("%s ring: %s", self._name, sorted(self._members.nodes))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except TierError as exc:
                log.warning("%s membership refresh failed: %s", self._name, exc)

    def _rebuild(self) -> None:
        self._ring = self._members.without(*self._suspects)

    def _expire_suspects(self) -> None:
        now = self._clock()
        back = [node for node, until in self._suspects.items() if until <= now]
        if back:
            for node in back:
                del self._suspects[node]
            self._rebuild()

    def suspect(self, node_id: NodeId) -> None:
        """Leave `node_id` out of the ring for `suspect_s`."""
        self._suspects[node_id] = self._clock() + self._suspect_s
        self._rebuild()

    def _client(self, node: NodeInfo) -> NodeClient:
        client = self._clients.get(node.address)
        if client is None:
            client = NodeClient(
                node.address,
                timeout_s=self._timeout,
                max_message_bytes=self._max_message,
                tier=self._name,
                token=self._token,
                tls_ca_file=self._tls_ca_file,
                tls_server_name=self._tls_server_name,
                data_plane=self._data_plane,
            )
            self._clients[node.address] = client
        return client

    def _require_ring(self) -> Ring:
        ring = self.ring
        if not len(ring):
            raise TierUnavailable(self._name, "no reachable cache node")
        return ring

    def _read_order(self, ring: Ring, key: BlockKey) -> list[NodeId]:
        order = ring.placement(key, self._replicas)
        for node in ring.candidates(key, self._replicas + self._fallback):
            if node not in order:
                order.append(node)
        return order

    def _failed(self, node: NodeInfo, exc: TierError) -> None:
        if not exc.retryable:
            log.warning("%s node %s refused a request: %s", self._name, node.node_id, exc)
            if self._metrics is not None:
                self._metrics.rejections.labels(self._name, "node").inc()
            return
        log.warning("%s node %s failed: %s", self._name, node.node_id, exc)
        if self._metrics is not None:
            self._metrics.failures.labels(self._name, "node", type(exc).__name__).inc()
        self.suspect(node.node_id)

    async def _rounds(self, keys: Sequence[BlockKey], call: str) -> list[object]:
        """Ask nodes in read order until each key is answered positively."""
        ring = self._require_ring()
        orders = [self._read_order(ring, key) for key in keys]
        results: list[object] = [None if call == "get" else False] * len(keys)
        pending = list(range(len(keys)))
        step = 0
        answered = False
        refused: TierRejected | None = None
        while pending:
            groups: dict[NodeId, list[int]] = defaultdict(list)
            for index in pending:
                if step < len(orders[index]):
                    groups[orders[index][step]].append(index)
            if not groups:
                break
            replies = await asyncio.gather(
                *(self._ask(ring.nodes[node], [keys[i] for i in indices], call) for node, indices in groups.items())
            )
            pending = []
            for (_node, indices), reply in zip(groups.items(), replies):
                if isinstance(reply, TierRejected):
                    refused = reply
                    reply = None
                answered = answered or reply is not None
                for position, index in enumerate(indices):
                    answer = None if reply is None else reply[position]
                    if answer:
                        results[index] = answer
                    else:
                        pending.append(index)
            step += 1
        if keys and not answered:
            if refused is not None:
                raise refused
            raise TierUnavailable(self._name, "no cache node answered")
        return results

    async def _ask(self, node: NodeInfo, keys: list[BlockKey], call: str) -> list[object] | TierRejected | None:
        client = self._client(node)
        try:
            if call == "exists":
                return list(await client.exists(keys))
            return list(await client.get(keys, check=self._intact))
        except TierError as exc:
            self._failed(node, exc)
            return exc if isinstance(exc, TierRejected) else None

    def _intact(self, key: bytes, frame: Buffer) -> bool:
        """Whether a frame read from a node passes its check (a failure is counted, and a miss)."""
        try:
            open_frame(key, frame)
        except CorruptBlock as exc:
            if self._metrics is not None:
                self._metrics.checksum_failures.labels(self._name, corruption_reason(exc)).inc()
            return False
        return True

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        return [bool(found) for found in await self._rounds(keys, "exists")]

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        return await self._rounds(keys, "get")  # type: ignore[return-value]

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> None:
        """Write each frame to its placement; a failed node's share is placed again.

        A node that fails is suspected, and its batch is sent once more to the
        placement the ring gives without it, so a leaving or dead node costs
        no write while other nodes answer. Blocks a node refuses (too large
        for it) are dropped and counted, never placed again.

        Raises:
            TierRejected: every node asked refused its batch.
            TierUnavailable: no node took any write, and some failed.
        """
        stored = False
        refused: TierRejected | None = None
        pending = list(items)
        for _attempt in range(2):
            ring = self._require_ring()
            groups: dict[NodeId, list[tuple[BlockKey, Buffer]]] = defaultdict(list)
            for key, frame in pending:
                for node in ring.placement(key, self._replicas):
                    groups[node].append((key, frame))
            outcomes = await asyncio.gather(
                *(self._put_one(ring.nodes[node], batch) for node, batch in groups.items())
            )
            stored = stored or any(outcome is None for outcome in outcomes)
            pending = []
            for batch, outcome in zip(groups.values(), outcomes):
                if isinstance(outcome, TierRejected):
                    refused = outcome
                    self._count_dropped("rejected", len(batch))
                elif outcome is not None:
                    pending.extend(batch)
            if not pending or not len(self.ring):
                break
        self._count_dropped("node_down", len(pending))
        if not stored:
            if refused is not None and not pending:
                raise refused
            raise TierUnavailable(self._name, "no cache node took the writes")

    def _count_dropped(self, reason: str, blocks: int) -> None:
        if blocks and self._metrics is not None:
            self._metrics.dropped_writes.labels(self._name, reason).inc(blocks)

    async def _put_one(self, node: NodeInfo, batch: list[tuple[BlockKey, Buffer]]) -> TierError | None:
        """Write one node's batch; None when it took the batch, else the error."""
        try:
            result = await self._client(node).put(batch)
        except TierError as exc:
            self._failed(node, exc)
            return exc
        # Blocks the node refused one by one (larger than it takes) are dropped, not retried.
        self._count_dropped("rejected", result.rejected)
        return None

    async def usage(self) -> Usage:
        nodes = list(self._require_ring().nodes.values())
        replies = await asyncio.gather(*(self._stats(node) for node in nodes))
        answered = [reply for reply in replies if reply is not None]
        if not answered:
            raise TierUnavailable(self._name, "no cache node answered")
        return Usage(
            bytes_used=sum(r.bytes_used for r in answered),
            capacity_bytes=sum(r.capacity_bytes for r in answered),
            blocks=sum(r.blocks for r in answered),
        )

    async def _stats(self, node: NodeInfo):  # type: ignore[no-untyped-def]
        try:
            return await self._client(node).stats()
        except TierError as exc:
            self._failed(node, exc)
            return None

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        await self._membership.aclose()
