"""Who is in the L2 ring: a static list, or nodes registered in Redis.

`make_membership(peers=..., redis_url=...)` picks the implementation: a Redis
URL means registration with heartbeats and expiry; otherwise the static list.
Kubernetes endpoints would be a third implementation of the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcache.membership.base import Membership
from kvcache.membership.redis import RedisMembership
from kvcache.membership.static import StaticMembership
from kvcache.ring import NodeInfo


def make_membership(
    *,
    peers: Sequence[NodeInfo] = (),
    redis_url: str | None = None,
    cluster: str = "default",
    ttl_s: float = 10.0,
    heartbeat_s: float = 2.0,
) -> Membership:
    """Build the membership source described by the settings.

    Args:
        peers: the static member list (used when `redis_url` is None).
        redis_url: register and discover nodes in this Redis.
        cluster: name separating several rings in one Redis.
        ttl_s: a registered node not heard from for this long is dropped.
        heartbeat_s: how often a registered node renews its entry.
    Returns:
        Redis registration when `redis_url` is set, else the static list
        (possibly empty: a lone node registers only itself).
    """
    if redis_url:
        return RedisMembership(redis_url, cluster=cluster, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
    return StaticMembership(peers)


__all__ = ["Membership", "RedisMembership", "StaticMembership", "make_membership"]
