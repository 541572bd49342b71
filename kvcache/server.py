"""An L2 cache node: the gRPC service, its block storage and its life cycle.

`CacheNode` binds a `grpc.aio` server, stores frames in a byte-budgeted
`LocalTier` (frames are kept opaque; clients check them; the bulk messages
are read and written in wire format by `kvcache.wire`), registers itself in
the membership, and on `leave` hands every block it holds to the block's new
owner before it stops serving. `kvcache.node` wraps it in the
``kvgate cache-node`` command, where SIGTERM triggers `leave`.

Hand-off rule: with the ring as it will be without this node, a block goes to
each node of its new placement that did not already hold it by placement (for
a replication factor of 1, its new owner). While leaving, the node refuses
writes (UNAVAILABLE, so clients move on) and still serves reads.

Not here: placement logic (`kvcache.ring`), the multi-node client
(`kvcache.tiers.peer`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio

from kvcache._pb import kvcache_pb2 as pb
from kvcache.client import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, NodeClient, channel_options
from kvcache.errors import TierError
from kvcache.eviction import DEFAULT_POLICY
from kvcache.framing import Buffer
from kvcache.keys import BlockKey
from kvcache.membership.base import Membership
from kvcache.metrics import NodeMetrics
from kvcache.ring import DEFAULT_VNODES, NodeId, NodeInfo, Ring
from kvcache.tiers.local import LocalTier
from kvcache.wire import WireError, decode_put_request, encode_get_response

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
        handoff_timeout_s: deadline for handing all blocks off.
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


@dataclass(slots=True)
class HandoffReport:
    """What a graceful leave moved.

    Attributes:
        blocks: blocks held when the hand-off started.
        sent: block copies accepted by their new owners.
        skipped: blocks whose new placement already held them.
        failed: blocks no new owner accepted.
        targets: blocks sent per receiving node.
    """

    blocks: int = 0
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    targets: dict[str, int] = field(default_factory=dict)


class _Service:
    """The RPC handlers over a node's storage.

    `Put` and `Get` take and return raw bytes in protobuf wire format
    (`kvcache.wire`); the other methods use the generated classes.
    """

    def __init__(self, node: CacheNode) -> None:
        self._node = node

    async def Exists(self, request: pb.KeysRequest, context: grpc.aio.ServicerContext) -> pb.ExistsResponse:
        self._node.metrics.requests.labels("Exists").inc()
        store = self._node.store
        return pb.ExistsResponse(present=[key in store for key in request.keys])

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> bytes:
        node = self._node
        node.metrics.requests.labels("Get").inc()
        limit = node.batch_bytes
        if request.max_bytes:
            limit = min(limit, request.max_bytes)
        frames: list[Buffer | None] = []
        size = hits = 0
        for key in request.keys:
            frame = node.store.get_frame(BlockKey(key))
            length = 0 if frame is None else len(frame)
            if frames and size + length > limit or not frames and length > limit:
                break
            frames.append(frame)
            size += length
            hits += frame is not None
        node.metrics.blocks.labels("Get", "hit").inc(hits)
        node.metrics.blocks.labels("Get", "miss").inc(len(frames) - hits)
        return encode_get_response(frames, len(frames))

    async def Put(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        node = self._node
        node.metrics.requests.labels("Put").inc()
        if node.leaving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is leaving the ring")
        try:
            blocks = decode_put_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed PutRequest: {exc}")
        stored = rejected = 0
        for key, frame in blocks:
            if node.store.put_frame(BlockKey(key), frame):
                stored += 1
            else:
                rejected += 1
        node.metrics.blocks.labels("Put", "stored").inc(stored)
        node.metrics.blocks.labels("Put", "rejected").inc(rejected)
        return pb.PutResponse(stored=stored, rejected=rejected)

    async def GetStream(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        node = self._node
        node.metrics.requests.labels("GetStream").inc()
        chunk = min(request.max_bytes or node.settings.chunk_bytes, node.batch_bytes)
        for key in request.keys:
            frame = node.store.get_frame(BlockKey(key))
            if frame is None:
                yield pb.Chunk(key=key, total=0)
                continue
            view = memoryview(frame)
            for offset in range(0, view.nbytes, chunk):
                yield pb.Chunk(key=key, total=view.nbytes, offset=offset, data=bytes(view[offset : offset + chunk]))

    async def PutStream(
        self, request_iterator: AsyncIterator[pb.Chunk], context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        node = self._node
        node.metrics.requests.labels("PutStream").inc()
        if node.leaving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is leaving the ring")
        stored = rejected = 0
        partial: dict[bytes, tuple[bytearray, int]] = {}
        async for chunk in request_iterator:
            if chunk.offset == 0 and len(chunk.data) == chunk.total:
                frame: Buffer = chunk.data
            else:
                buffer, received = partial.get(chunk.key, (bytearray(chunk.total), 0))
                buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
                received += len(chunk.data)
                if received < chunk.total:
                    partial[chunk.key] = (buffer, received)
                    continue
                partial.pop(chunk.key, None)
                frame = bytes(buffer)
            if node.store.put_frame(BlockKey(chunk.key), frame):
                stored += 1
            else:
                rejected += 1
        rejected += len(partial)
        node.metrics.blocks.labels("PutStream", "stored").inc(stored)
        node.metrics.blocks.labels("PutStream", "rejected").inc(rejected)
        return pb.PutResponse(stored=stored, rejected=rejected)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        node = self._node
        return pb.StatsResponse(
            node_id=node.info.node_id,
            blocks=len(node.store),
            bytes_used=node.store.used_bytes,
            capacity_bytes=node.store.capacity_bytes,
        )


def _handlers(service: _Service) -> grpc.GenericRpcHandler:
    """The service's method table: raw wire bytes for Put and Get, generated classes otherwise."""
    name = pb.DESCRIPTOR.services_by_name["KVCache"].full_name
    return grpc.method_handlers_generic_handler(
        name,
        {
            "Exists": grpc.unary_unary_rpc_method_handler(
                service.Exists,
                request_deserializer=pb.KeysRequest.FromString,
                response_serializer=pb.ExistsResponse.SerializeToString,
            ),
            "Get": grpc.unary_unary_rpc_method_handler(
                service.Get, request_deserializer=pb.GetRequest.FromString, response_serializer=None
            ),
            "Put": grpc.unary_unary_rpc_method_handler(
                service.Put, request_deserializer=None, response_serializer=pb.PutResponse.SerializeToString
            ),
            "GetStream": grpc.unary_stream_rpc_method_handler(
                service.GetStream,
                request_deserializer=pb.GetRequest.FromString,
                response_serializer=pb.Chunk.SerializeToString,
            ),
            "PutStream": grpc.stream_unary_rpc_method_handler(
                service.PutStream,
                request_deserializer=pb.Chunk.FromString,
                response_serializer=pb.PutResponse.SerializeToString,
            ),
            "Stats": grpc.unary_unary_rpc_method_handler(
                service.Stats,
                request_deserializer=pb.StatsRequest.FromString,
                response_serializer=pb.StatsResponse.SerializeToString,
            ),
        },
    )


class CacheNode:
    """One L2 cache node.

    Args:
        settings: how to run.
        membership: where to register and find the other members.
        metrics: the node's metrics (on a registry its owner exposes).
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
        self.leaving = False
        self._membership = membership
        self._server: grpc.aio.Server | None = None
        self._info: NodeInfo | None = None

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
        server = grpc.aio.server(options=channel_options(settings.max_message_bytes))
        server.add_generic_rpc_handlers((_handlers(_Service(self)),))
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
        await server.start()
        self._server = server
        advertise = settings.advertise_host or (
            "127.0.0.1" if settings.host in ("", "0.0.0.0", "::", "[::]") else settings.host
        )
        address = f"{advertise}:{port}"
        self._info = NodeInfo(NodeId(settings.node_id or address), address, settings.labels)
        await self._membership.register(self._info)
        members = await self._membership.members()
        self.metrics.members.set(len(members))
        log.info("cache node %s serving on %s (%d members)", self._info.node_id, address, len(members))
        return self._info

    async def leave(self) -> HandoffReport:
        """Leave the ring gracefully: deregister, refuse writes, hand blocks off.

        Returns:
            What was handed off.
        """
        me = self.info
        self.leaving = True
        await self._membership.deregister(me.node_id)
        others = [node for node in await self._membership.members() if node.node_id != me.node_id]
        report = HandoffReport(blocks=len(self.store))
        if not others:
            report.failed = len(self.store)
            log.warning("no other node to hand %d blocks to", report.failed)
            return report
        ring_after = Ring(others, vnodes=self.settings.vnodes)
        ring_before = ring_after.with_node(me)
        replicas = self.settings.replicas
        # key -> the new-ring nodes that may receive it, best first.
        queue: dict[NodeId, list[BlockKey]] = defaultdict(list)
        fallbacks: dict[BlockKey, list[NodeId]] = {}
        for key in self.store.keys():
            before = ring_before.placement(key, replicas)
            after = ring_after.placement(key, replicas)
            if me.node_id in before:
                kept = set(before) - {me.node_id}
                targets = [node for node in after if node not in kept]
            else:
                kept, targets = set(), after[:1]  # a stray copy: give it to the owner
            if not targets:
                report.skipped += 1
                continue
            for target in targets:
                queue[target].append(key)
            fallbacks[key] = [n for n in ring_after.candidates(key) if n not in kept and n not in targets]
        async with asyncio.timeout(self.settings.handoff_timeout_s):
            while queue:
                retry: dict[NodeId, list[BlockKey]] = defaultdict(list)
                outcomes = await asyncio.gather(
                    *(self._send(ring_after.nodes[target], keys) for target, keys in queue.items())
                )
                for (target, keys), ok in zip(queue.items(), outcomes):
                    if ok:
                        report.sent += len(keys)
                        report.targets[target] = report.targets.get(target, 0) + len(keys)
                        continue
                    for key in keys:
                        options = fallbacks.get(key, [])
                        if options:
                            retry[options.pop(0)].append(key)
                        else:
                            report.failed += 1
                queue = retry
        self.metrics.handoff_blocks.labels("sent").inc(report.sent)
        self.metrics.handoff_blocks.labels("failed").inc(report.failed)
        log.info("hand-off of %s: %s", me.node_id, report)
        return report

    async def _send(self, target: NodeInfo, keys: list[BlockKey]) -> bool:
        client = NodeClient(
            target.address,
            timeout_s=self.settings.handoff_timeout_s,
            max_message_bytes=self.settings.max_message_bytes,
            chunk_bytes=self.settings.chunk_bytes,
        )
        items: list[tuple[BlockKey, Buffer]] = []
        for key in keys:
            frame = self.store.peek(key)
            if frame is not None:
                items.append((key, frame))
        try:
            result = await client.put_stream(items, timeout_s=self.settings.handoff_timeout_s)
        except TierError as exc:
            log.warning("hand-off to %s failed: %s", target.node_id, exc)
            return False
        finally:
            await client.aclose()
        return result.rejected == 0

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving (after `leave`, or abruptly without it)."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        await self._membership.aclose()
