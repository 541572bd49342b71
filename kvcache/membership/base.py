"""The interface of a membership source for the L2 ring.

Clients call `members` periodically and rebuild their ring from the answer;
nodes call `register` when they start serving and `deregister` when they
leave. Implementations are async and safe to call from one event loop.
"""

from __future__ import annotations

from typing import Protocol

from kvcache.ring import NodeId, NodeInfo


class Membership(Protocol):
    """Where the current L2 members are listed."""

    async def members(self) -> list[NodeInfo]:
        """The live members, in no particular order.

        Raises:
            TierUnavailable: the source cannot be read right now.
        """
        ...

    async def register(self, node: NodeInfo) -> None:
        """Announce `node` and keep it announced until `deregister`."""
        ...

    async def deregister(self, node_id: NodeId) -> None:
        """Withdraw a node announced by `register` (idempotent)."""
        ...

    async def aclose(self) -> None:
        """Stop heartbeats and release connections."""
        ...
