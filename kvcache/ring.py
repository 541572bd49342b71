"""Placement of blocks on L2 cache nodes: consistent hashing with anti-affinity.

A `Ring` is an immutable view of the members (nodes and their labels) over a
`uhashring.HashRing` (md5, 160 virtual nodes per node by default, as ketama).
A key's owner is the first node clockwise from the key's point; its replicas
are the next distinct nodes, chosen first from zones not yet used, then from
hosts not yet used, then from any node: copies of one block land on different
failure domains whenever the membership allows it.

Membership changes build a new `Ring` (`with_node`, `without`): uhashring
mutation is not thread-safe, so nothing mutates a ring that readers may hold.

Who uses it: the L2 client (`kvcache.tiers.peer`) to place reads and writes,
and the cache node (`kvcache.server`) to find each block's new owner when it
leaves. Both must build rings from the same members with the same `vnodes`.
"""

from __future__ import annotations

import bisect
import itertools

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NewType
from urllib.parse import parse_qsl, urlencode

from uhashring import HashRing

from kvcache.errors import ConfigError

NodeId = NewType("NodeId", str)

DEFAULT_VNODES = 160


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One L2 cache node as the ring sees it.

    Attributes:
        node_id: unique name of the node.
        address: ``host:port`` of its gRPC service.
        labels: where it runs, e.g. ``(("host", "h1"), ("zone", "z1"))``;
            sorted pairs so the value is hashable.
    """

    node_id: NodeId
    address: str
    labels: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def make(cls, node_id: str, address: str, labels: Mapping[str, str] | None = None) -> NodeInfo:
        """Build a `NodeInfo` from a plain mapping of labels."""
        return cls(NodeId(node_id), address, tuple(sorted((labels or {}).items())))

    @classmethod
    def parse(cls, spec: str) -> NodeInfo:
        """Parse ``[ID=]HOST:PORT[?host=H&zone=Z]``.

        The id defaults to the address; the ``host`` label defaults to the
        address's host.

        Raises:
            ConfigError: no ``HOST:PORT`` in the spec.
        """
        spec = spec.strip()
        head, _, query = spec.partition("?")
        node_id, sep, address = head.partition("=")
        if not sep:
            node_id, address = head, head
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad node spec {spec!r}: expected [ID=]HOST:PORT[?k=v&...], PORT 1 to 65535")
        return cls.make(node_id, address, dict(parse_qsl(query)))

    def spec(self) -> str:
        """The inverse of `parse`."""
        query = f"?{urlencode(self.labels)}" if self.labels else ""
        return f"{self.node_id}={self.address}{query}"

    def label(self, name: str, default: str = "") -> str:
        """The value of one label."""
        for key, value in self.labels:
            if key == name:
                return value
        return default

    @property
    def host(self) -> str:
        """The ``host`` label, else the host part of the address."""
        return self.label("host") or self.address.rpartition(":")[0]

    @property
    def zone(self) -> str:
        """The ``zone`` label, or an empty string."""
        return self.label("zone")

    def to_json(self) -> str:
        """Serialise for a membership registry."""
        return json.dumps({"id": self.node_id, "address": self.address, "labels": dict(self.labels)})

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeInfo:
        """The inverse of `to_json`."""
        data = json.loads(text)
        return cls.make(data["id"], data["address"], data.get("labels"))


#: Keys whose ring order a `Ring` remembers before starting afresh.
MAX_REMEMBERED_KEYS = 1 << 14


class Ring:
    """An immutable consistent-hash ring over cache nodes.

    Args:
        nodes: the members.
        vnodes: points per node on the ring.
    """

    __slots__ = ("_nodes", "_vnodes", "_ring", "_orders", "_points", "_owners")

    def __init__(self, nodes: Iterable[NodeInfo], *, vnodes: int = DEFAULT_VNODES) -> None:
        self._nodes: dict[NodeId, NodeInfo] = {node.node_id: node for node in nodes}
        self._vnodes = vnodes
        self._ring = HashRing(
            nodes={node_id: {"instance": node_id, "vnodes": vnodes} for node_id in self._nodes}
        )
        # NOTE: uhashring's own walk (`range`) copies its point list on every
        # call: 20 to 50 us a key, profiled with scripts/bench_kvcache.py
        # --sections l2, as much as moving a 64 KiB block. The same points,
        # in the same order, are walked here with a bisect (tests compare the
        # two), and each key's order is kept, since the ring never changes.
        runtime = self._ring.runtime
        self._points: list[int] = list(runtime._keys)
        self._owners: list[NodeId] = [NodeId(runtime._nodes[runtime._ring[p]]["instance"]) for p in self._points]
        self._orders: dict[bytes, list[NodeId]] = {}

    @property
    def nodes(self) -> Mapping[NodeId, NodeInfo]:
        """The members by id."""
        return self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def with_node(self, node: NodeInfo) -> Ring:
        """A new ring with `node` added (or updated)."""
        return Ring([*(n for n in self._nodes.values() if n.node_id != node.node_id), node], vnodes=self._vnodes)

    def without(self, *node_ids: NodeId) -> Ring:
        """A new ring without the given nodes."""
        drop = set(node_ids)
        return Ring([n for n in self._nodes.values() if n.node_id not in drop], vnodes=self._vnodes)

    def candidates(self, key: bytes, count: int | None = None) -> list[NodeId]:
        """Successive distinct nodes clockwise from the key's point.

        Args:
            key: the block key.
            count: how many; all nodes when None.
        """
        if not self._nodes:
            return []
        order = self._orders.get(key)
        if order is None:
            if len(self._orders) >= MAX_REMEMBERED_KEYS:
                self._orders.clear()
            order = self._walk(key)
            self._orders[key] = order
        return order[:count] if count is not None else list(order)

    def _walk(self, key: bytes) -> list[NodeId]:
        """Every node, in ring order from the key's point (uhashring's `range`, without its copies)."""
        points, owners = self._points, self._owners
        start = bisect.bisect(points, self._ring.hashi(key.hex()))
        wanted = len(self._nodes)
        order: list[NodeId] = []
        seen: set[NodeId] = set()
        for index in itertools.chain(range(start, len(points)), range(start)):
            node = owners[index]
            if node not in seen:
                seen.add(node)
                order.append(node)
                if len(order) == wanted:
                    break
        return order

    def owner(self, key: bytes) -> NodeId | None:
        """The node that owns `key`, or None on an empty ring."""
        if not self._nodes:
            return None
        return NodeId(self._ring.get_node(key.hex()))

    def placement(self, key: bytes, replicas: int) -> list[NodeId]:
        """The owner of `key` and its replicas, on distinct failure domains.

        Replicas are picked from successive ring nodes: first nodes in a zone
        not yet used, then nodes on a host not yet used, then any node. Fewer
        than `replicas` nodes are returned only when the ring is smaller.

        Args:
            key: the block key.
            replicas: total copies wanted (1 = owner only).
        """
        ordered = self.candidates(key)
        if replicas <= 1 or len(ordered) <= 1:
            return ordered[:1]
        chosen = [ordered[0]]
        for domain in ("zone", "host", None):
            used = {self._domain(node_id, domain) for node_id in chosen}
            for node_id in ordered:
                if len(chosen) >= replicas:
                    return chosen
                if node_id in chosen:
                    continue
                value = self._domain(node_id, domain)
                if domain is None or value not in used:
                    chosen.append(node_id)
                    used.add(value)
        return chosen

    def _domain(self, node_id: NodeId, domain: str | None) -> str:
        node = self._nodes[node_id]
        if domain == "zone":
            return node.zone
        if domain == "host":
            return node.host
        return node_id
