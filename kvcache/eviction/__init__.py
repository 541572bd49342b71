"""Eviction policies for byte-budgeted block stores (L1 and the cache nodes).

`POLICIES` names each policy; `make_policy(name, capacity_bytes)` builds one.
The default, S3-FIFO, was chosen by measurement (see scripts/bench_kvcache.py,
section "eviction"): on prefix-sharing KV traces it keeps more hits than LRU,
because most blocks (the unique tail of each prompt) are used once.
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

DEFAULT_POLICY: PolicyName = "s3fifo"


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
