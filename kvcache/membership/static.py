"""A fixed list of L2 members, given on the command line or in config.

Nothing is announced anywhere: `register` and `deregister` only change this
process's own view. A node that leaves is found out by its clients when its
port stops answering (the L2 client then skips it), so static membership
suits a fixed fleet; use Redis registration when nodes come and go.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvcache.ring import NodeId, NodeInfo


class StaticMembership:
    """Members from a list.

    Args:
        nodes: the members.
    """

    def __init__(self, nodes: Iterable[NodeInfo]) -> None:
        self._nodes: dict[NodeId, NodeInfo] = {node.node_id: node for node in nodes}

    async def members(self) -> list[NodeInfo]:
        return list(self._nodes.values())

    async def register(self, node: NodeInfo) -> None:
        self._nodes[node.node_id] = node

    async def deregister(self, node_id: NodeId) -> None:
        self._nodes.pop(node_id, None)

    async def aclose(self) -> None:
        return None
