"""The tiers of the KV block store, one implementation per file.

- `local.LocalTier`: L1, this process's memory.
- `peer.PeerTier`: L2, a ring of cache nodes over gRPC.
- `redis.RedisTier`: L3 in Redis.
- `disk.DiskTier`: L3 in a local directory (the embedded default).

`kvcache.wiring` builds them from settings.
"""

from __future__ import annotations

from kvcache.tiers.base import HitSource, Tier, Usage
from kvcache.tiers.disk import DiskTier
from kvcache.tiers.local import ChangeListener, LocalTier
from kvcache.tiers.peer import PeerTier
from kvcache.tiers.redis import RedisTier

__all__ = ["ChangeListener", "DiskTier", "HitSource", "LocalTier", "PeerTier", "RedisTier", "Tier", "Usage"]
