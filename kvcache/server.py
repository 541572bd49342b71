"""An L2 cache node: the gRPC service, its block storage and its life cycle.

`CacheNode` binds a `grpc.aio` server (and, beside it, the framed data port
of `kvcache.datapath.listener`), stores frames in a byte-budgeted
`LocalTier` (frames are kept opaque; clients check them; the bulk messages
are read and written in wire format by `kvcache.wire`), registers itself in
the membership, and on `leave` hands every block it holds to the block's new
owner before it stops serving (`kvcache.handoff`). `kvcache.node` wraps it
in the ``kvgate cache-node`` command, where SIGTERM triggers `leave`. While
leaving, the node refuses writes (UNAVAILABLE, so clients move on) and still
serves reads.

Callers are authenticated by token and each tenant's keys are scoped
(`kvcache.auth`); the handlers (`kvcache.service`) reassemble streamed uploads
within a memory budget (`kvcache.uploads`); every count and size a caller sends is checked before it
decides an allocation.

Not here: placement logic (`kvcache.ring`), the multi-node client
(`kvcache.tiers.peer`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from kvcache.auth import AuthInterceptor, Authenticator
from kvcache.client import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, NodeClient, channel_options
from kvcache.datapath.listener import DataListener
from kvcache.errors import ConfigError, TierError
from kvcache.eviction import DEFAULT_POLICY
from kvcache.framing import Buffer
from kvcache.handoff import Handoff, HandoffReport
from kvcache.keys import BlockKey
from kvcache.membership.base import Membership
from kvcache.metrics import NodeMetrics
from kvcache.ring import DEFAULT_VNODES, NodeId, NodeInfo
from kvcache.service import service_handlers
from kvcache.tiers.local import LocalTier
from kvcache.uploads import UploadBudget

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """How one cache node runs.

    Attributes:
        node_id: unique name in the ring (default: the advertised address).
        host: interface to bind.
        port: port to bind; 0 picks a free one.
        advertise_host: host clients use to reach this node (default: `host`,
            or 127.0.0.1 when binding every interface).
        labels: where the node runs, e.g. ``{"host": "h1", "zone": "z1"}``,
            for replica anti-affinity.
        capacity_bytes: byte budget of stored frames (default 1 GiB).
        policy: eviction policy name (`kvcache.eviction.POLICIES`).
        replicas: replication factor the clients use; must match theirs so
            hand-off sends blocks where clients will look.
        vnodes: ring points per node; must match the clients'.
        max_message_bytes: gRPC message cap (default 64 MiB); must not be
            below the clients'.
        chunk_bytes: chunk size of streamed transfers (default 4 MiB).
        handoff_timeout_s: deadline for handing all blocks off; when it
            passes, what is left counts as failed and the node stops anyway.
        max_block_bytes: largest frame the node accepts (default 256 MiB,
            never above `capacity_bytes`); a streamed frame claiming more is
            refused before anything is allocated.
        upload_budget_bytes: most bytes held, over all streams, in frames
            still being uploaded (default 256 MiB, never above
            `capacity_bytes`); beyond it uploads get RESOURCE_EXHAUSTED.
        upload_idle_timeout_s: longest wait for the next chunk of a stream
            (default 30 s), so a stalled caller cannot hold its reservation.
        max_concurrent_rpcs: calls served at once; more are refused with
            RESOURCE_EXHAUSTED by gRPC (default 256).
        cluster_token: token of the nodes and of single-tenant engines
            (`kvcache.auth`); empty with no tenant tokens leaves the node
            open, which suits only a node bound to 127.0.0.1.
        tenant_tokens: (tenant, token) pairs; each tenant's blocks are kept
            apart from every other's. Needs `cluster_token`.
        tls_cert_file: PEM certificate chain to serve TLS with (empty: plain
            TCP); needs `tls_key_file`.
        tls_key_file: PEM private key of `tls_cert_file`.
        tls_ca_file: PEM roots the node trusts when it hands blocks to other
            nodes (default: `tls_cert_file`, for a certificate shared by all).
        data_plane: serve the framed data protocol (`kvcache.datapath`,
            proto/README.md) beside gRPC (default on): frames move there at
            about half gRPC's CPU per byte. Off, or with TLS (the data port
            has none), clients use gRPC for everything.
        data_port: port of the data protocol on `host`; 0 (default) picks
            a free one, which clients learn from the ``DataPath`` call.
        data_idle_timeout_s: a data connection with no request for this long
            is closed (default 300 s; clients open another when they need one).
    """

    node_id: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    capacity_bytes: int = 1 << 30
    policy: str = DEFAULT_POLICY
    replicas: int = 1
    vnodes: int = DEFAULT_VNODES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    handoff_timeout_s: float = 60.0
    max_block_bytes: int = 256 << 20
    upload_budget_bytes: int = 256 << 20
    upload_idle_timeout_s: float = 30.0
    max_concurrent_rpcs: int = 256
    cluster_token: str = field(default="", repr=False)
    tenant_tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    data_plane: bool = True
    data_port: int = 0
    data_idle_timeout_s: float = 300.0


class CacheNode:
    """One L2 cache node.

    Args:
        settings: how to run.
        membership: where to register and find the other members.
        metrics: the node's metrics (on a registry its owner exposes).

    Raises:
        ConfigError: unusable tokens (`kvcache.auth.Authenticator`) or half a TLS setup.
    """

    def __init__(self, settings: NodeSettings, *, membership: Membership, metrics: NodeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = LocalTier(
            settings.capacity_bytes,
            policy=settings.policy,
            verify_reads=False,
            name="node",
            metrics=metrics.store,
        )
        metrics.store.prime("node")
        self.batch_bytes = max(1, settings.max_message_bytes - (64 << 10))
        self.max_block_bytes = min(settings.max_block_bytes, settings.capacity_bytes)
        self.uploads = UploadBudget(min(settings.upload_budget_bytes, settings.capacity_bytes))
        self.auth = Authenticator(settings.cluster_token, dict(settings.tenant_tokens))
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise ConfigError("TLS needs both a certificate and its key")
        self.leaving = False
        self._membership = membership
        self._server: grpc.aio.Server | None = None
        self._data: DataListener | None = None
        self._info: NodeInfo | None = None

    @property
    def data_port(self) -> int:
        """Port of the framed data protocol, 0 when the node serves none."""
        return self._data.port if self._data is not None else 0

    @property
    def info(self) -> NodeInfo:
        """This node as members see it (after `start`)."""
        if self._info is None:
            raise RuntimeError("node not started")
        return self._info

    async def start(self) -> NodeInfo:
        """Bind, serve and register in the membership.

        Returns:
            This node's `NodeInfo` (with the port actually bound).
        """
        settings = self.settings
        refused = self.metrics.rejected.labels
        server = grpc.aio.server(
            options=channel_options(settings.max_message_bytes),
            interceptors=(AuthInterceptor(self.auth, lambda method: refused(method, "unauthenticated").inc()),),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers((service_handlers(self),))
        bind = f"{settings.host}:{settings.port}"
        if settings.tls_cert_file:
            try:
                chain = Path(settings.tls_cert_file).read_bytes()
                private = Path(settings.tls_key_file).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the TLS files: {exc}") from exc
            port = server.add_secure_port(bind, grpc.ssl_server_credentials([(private, chain)]))
        else:
            port = server.add_insecure_port(bind)
        await server.start()
        self._server = server
        if settings.data_plane and not settings.tls_cert_file:
            self._data = DataListener(self, idle_timeout_s=settings.data_idle_timeout_s)
            await self._data.start(settings.host, settings.data_port)
        loopback = settings.host in ("127.0.0.1", "localhost", "::1")
        if self.auth.open and not loopback:
            log.warning("cache node on %s accepts calls without a token: anyone who reaches it can read and write every block", bind)
        advertise = settings.advertise_host or (
            "127.0.0.1" if settings.host in ("", "0.0.0.0", "::", "[::]") else settings.host
        )
        address = f"{advertise}:{port}"
        self._info = NodeInfo(NodeId(settings.node_id or address), address, settings.labels)
        await self._membership.register(self._info)
        members = await self._membership.members()
        self.metrics.members.set(len(members))
        log.info(
            "cache node %s serving on %s (data port %s, %d members)",
            self._info.node_id, address, self.data_port or "off", len(members),
        )
        return self._info

    async def leave(self) -> HandoffReport:
        """Leave the ring gracefully: deregister, refuse writes, hand blocks off.

        Bounded by `NodeSettings.handoff_timeout_s` as a whole: when it
        passes, or the membership cannot be reached, the node gives up and
        counts what it could not send as failed; it never raises for either,
        so `stop` always follows.

        Returns:
            What was handed off.
        """
        me = self.info
        self.leaving = True
        report = HandoffReport(blocks=len(self.store))
        handoff: Handoff | None = None
        try:
            async with asyncio.timeout(self.settings.handoff_timeout_s):
                await self._membership.deregister(me.node_id)
                others = [node for node in await self._membership.members() if node.node_id != me.node_id]
                if not others:
                    report.failed = len(self.store)
                    log.warning("no other node to hand %d blocks to", report.failed)
                    return report
                handoff = Handoff(
                    me, others, self.store.keys(), replicas=self.settings.replicas, vnodes=self.settings.vnodes,
                    report=report,
                )
                await handoff.run(self._send)
        except TimeoutError:
            report.timed_out = True
            report.failed += handoff.unsent if handoff is not None else report.blocks
            log.warning("hand-off of %s cut short after %.0fs", me.node_id, self.settings.handoff_timeout_s)
        except TierError as exc:
            report.failed += handoff.unsent if handoff is not None else report.blocks
            log.warning("hand-off of %s failed: %s", me.node_id, exc)
        self.metrics.handoff_blocks.labels("sent").inc(report.sent)
        self.metrics.handoff_blocks.labels("failed").inc(report.failed)
        log.info("hand-off of %s: %s", me.node_id, report)
        return report

    def _client(self, address: str) -> NodeClient:
        settings = self.settings
        ca = settings.tls_ca_file or settings.tls_cert_file
        return NodeClient(
            address,
            timeout_s=settings.handoff_timeout_s,
            max_message_bytes=settings.max_message_bytes,
            chunk_bytes=settings.chunk_bytes,
            token=settings.cluster_token,
            tls_ca_file=ca,
        )

    async def _send(self, target: NodeInfo, keys: list[BlockKey]) -> bool:
        client = self._client(target.address)
        items: list[tuple[BlockKey, Buffer]] = []
        for key in keys:
            frame = self.store.peek(key)
            if frame is not None:
                items.append((key, frame))
        try:
            # The whole hand-off's deadline (in `leave`) comes first; this one only backs it up.
            result = await client.put_stream(items, timeout_s=self.settings.handoff_timeout_s + 5.0)
        except TierError as exc:
            log.warning("hand-off to %s failed: %s", target.node_id, exc)
            return False
        finally:
            await client.aclose()
        return result.rejected == 0

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving (after `leave`, or abruptly without it)."""
        if self._data is not None:
            await self._data.stop()
            self._data = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        await self._membership.aclose()
