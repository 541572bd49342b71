"""Eviction policies for byte-budgeted block stores (L1 and the cache nodes).

`POLICIES` names each policy; `make_policy(name, capacity_bytes)` builds one.
The default, LRU, was chosen by measurement (scripts/bench_kvcache.py, section
"eviction", which replays traces behind an engine's own prefix cache): on real
multi-turn chats (ShareGPT) LRU keeps up to a third more hits than S3-FIFO,
because a conversation's next turn re-reads its whole history after a gap
longer than S3-FIFO's probation queue; on retrieval prompts (popular documents,
one-off questions) S3-FIFO keeps up to 30% more. Chat is the gateway's main
workload, so LRU is the default and S3-FIFO a setting (``l1.policy``,
``kvgate cache-node --policy``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from kvcache.errors import ConfigError
from kvcache.eviction.base import EvictionPolicy
from kvcache.eviction.lru import LRUPolicy
from kvcache.eviction.s3fifo import S3FIFOPolicy

PolicyName = Literal["lru", "s3fifo"]

#: policy name -> constructor taking the store's capacity in bytes.
POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": lambda capacity: LRUPolicy(),
    "s3fifo": lambda capacity: S3FIFOPolicy(capacity),
}

DEFAULT_POLICY: PolicyName = "lru"


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """Build the eviction policy called `name`.

    Raises:
        ConfigError: if no policy has that name.
    """
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; known: {sorted(POLICIES)}") from None
    return factory(capacity_bytes)


__all__ = ["DEFAULT_POLICY", "POLICIES", "EvictionPolicy", "PolicyName", "make_policy"]
