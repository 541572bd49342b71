"""A leaving cache node's hand-off: which block goes where, and sending it there.

Rule: with the ring as it will be without the leaving node, a block goes to
each node of its new placement that did not already hold it by placement (for
a replication factor of 1, its new owner); a copy the node held off its
placement (a stray) goes to the block's owner. A target that refuses or fails
a batch has its blocks offered to the next ring nodes that do not hold them.

Placement uses the block key a client placed by (`kvcache.auth.placement_key`:
a tenant's stored keys carry a scope in front), and the blocks are sent under
their stored keys with the cluster token, so each tenant's blocks stay its own.

Who uses it: `kvcache.server.CacheNode.leave`, which bounds it in time and
counts what was still unsent at the deadline as failed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from kvcache.auth import placement_key
from kvcache.keys import BlockKey
from kvcache.ring import NodeId, NodeInfo, Ring

#: Sends blocks to one node; True when it took them all.
Sender = Callable[[NodeInfo, list[BlockKey]], Awaitable[bool]]


@dataclass(slots=True)
class HandoffReport:
    """What a graceful leave moved.

    Attributes:
        blocks: blocks held when the hand-off started.
        sent: block copies accepted by their new owners.
        skipped: blocks whose new placement already held them.
        failed: block copies no new owner accepted, or still unsent when
            the hand-off's deadline passed.
        timed_out: whether the deadline cut the hand-off short.
        targets: blocks sent per receiving node.
    """

    blocks: int = 0
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    timed_out: bool = False
    targets: dict[str, int] = field(default_factory=dict)


class Handoff:
    """One hand-off, planned at construction and run by `run`.

    Args:
        me: the leaving node.
        others: the members that stay.
        keys: the stored keys the leaving node holds.
        replicas: replication factor (the clients').
        vnodes: ring points per node (the clients').
        report: where to count.
    """

    def __init__(
        self,
        me: NodeInfo,
        others: list[NodeInfo],
        keys: Iterable[BlockKey],
        *,
        replicas: int,
        vnodes: int,
        report: HandoffReport,
    ) -> None:
        self.report = report
        self.ring = Ring(others, vnodes=vnodes)
        ring_before = self.ring.with_node(me)
        #: target -> stored keys being (or to be) sent to it in the current round.
        self.queue: dict[NodeId, list[BlockKey]] = defaultdict(list)
        self._fallbacks: dict[BlockKey, list[NodeId]] = {}
        for key in keys:
            placed = placement_key(key)
            before = ring_before.placement(placed, replicas)
            after = self.ring.placement(placed, replicas)
            if me.node_id in before:
                kept = set(before) - {me.node_id}
                targets = [node for node in after if node not in kept]
            else:
                kept, targets = set(), after[:1]  # a stray copy: give it to the owner
            if not targets:
                report.skipped += 1
                continue
            for target in targets:
                self.queue[target].append(key)
            self._fallbacks[key] = [n for n in self.ring.candidates(placed) if n not in kept and n not in targets]

    @property
    def unsent(self) -> int:
        """Block copies not yet accepted by anyone (in flight or waiting)."""
        return sum(len(keys) for keys in self.queue.values())

    async def run(self, send: Sender) -> None:
        """Send every block, falling back to other nodes, until each is placed or has no option left."""
        report = self.report
        while self.queue:
            retry: dict[NodeId, list[BlockKey]] = defaultdict(list)
            rounds = list(self.queue.items())
            outcomes = await asyncio.gather(*(send(self.ring.nodes[target], keys) for target, keys in rounds))
            for (target, keys), ok in zip(rounds, outcomes):
                if ok:
                    report.sent += len(keys)
                    report.targets[target] = report.targets.get(target, 0) + len(keys)
                    continue
                for key in keys:
                    options = self._fallbacks.get(key, [])
                    if options:
                        retry[options.pop(0)].append(key)
                    else:
                        report.failed += 1
            self.queue = retry
