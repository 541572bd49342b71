"""The policy interface: a policy prices each pod for one request; the router takes the cheapest.

Policies are pure scorers. They read the request (`RouteRequest`, built once by
the gateway: tokens, block hashes, what the prefix index matched on each pod)
and the pods' state, and return one cost per pod, lower is better. They never
pick, never mutate pods and never await: the router combines costs (a weighted
mix min-max normalises each policy's costs first), takes the argmin and counts
the request in flight in the same synchronous step, so bursts spread.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from kvcache.keys import BlockHash
from router.fairness import VirtualTokenCounters
from router.pods import Pod, PodId, UserId
from router.settings import RoutingSettings
from router.shared_tier import TierMatch


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy sees of one request."""

    user: UserId
    model: str
    prompt_tokens: int
    """Prompt length in tokens (or bytes, without a tokenizer)."""
    block_size: int
    """Tokens per KV block on the pods."""
    block_hashes: tuple[BlockHash, ...] = ()
    matched_blocks: Mapping[PodId, int] = field(default_factory=dict)
    """Pod -> leading blocks of this prompt the prefix index believes the pod holds."""
    occupancy: Mapping[PodId, float] = field(default_factory=dict)
    """Pod -> what caching one more block there costs later, in blocks (0..2): its fullness plus
    the share of its capacity holding blocks requests came back for (`PrefixIndex.eviction_price`)."""
    session_key: str | None = None
    max_tokens: int | None = None
    tiers: TierMatch | None = None
    """What the shared KV cache can load for this prompt, and at what price; None when no pod loads from one."""

    def prefill_work(self, pod: Pod, matched: int) -> float:
        """Prefill-token cost of the prompt on `pod`, whose GPU holds its first `matched` blocks.

        The tokens not on the GPU cost one each, except those the shared KV
        cache can load into it, which cost the learned load ratio (`router.shared_tier`).
        """
        miss = max(self.prompt_tokens - matched * self.block_size, 0)
        return miss if self.tiers is None else self.tiers.work(pod, matched, miss)


@dataclass(frozen=True, slots=True)
class PolicyDeps:
    """What policies may be built with."""

    settings: RoutingSettings
    counters: VirtualTokenCounters
    rng: random.Random


class Policy(Protocol):
    """Prices pods for a request."""

    name: ClassVar[str]

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        """One cost per pod in `pods` order; lower is better. No side effects on pods."""
        ...

    # Optional, for large fleets (see `router.fleet_order`):
    #
    #     def shortlist(self, request, fleet: FleetOrder, eligible) -> list[Pod]
    #
    # The eligible pods among which `costs` has its minimum, found by walking
    # the fleet's load orderings instead of pricing every pod; the router then
    # prices only those. A policy without it (round-robin, random,
    # session-affinity, vtc-basic, prefix-cache, least-kv-cache: each reads
    # every pod, or the fleet's order or spread) is given every pod.


def load(pod: Pod) -> int:
    """Requests on `pod`: the gateways' count (every replica's) plus those others sent the engine (`Pod.load`)."""
    return pod.load
