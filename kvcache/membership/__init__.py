"""Who is in the L2 ring: a static list, nodes registered in Redis, or pods on Kubernetes.

`make_membership(...)` picks the implementation: a Kubernetes selector means
the serving pods that carry those labels (`kubernetes`); a Redis URL means
registration with heartbeats and expiry (`redis`); otherwise the static list.
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
    kubernetes_selector: str = "",
    kubernetes_namespace: str = "",
    kubernetes_port: int = 0,
    kubernetes_api_url: str = "",
) -> Membership:
    """Build the membership source described by the settings.

    Args:
        peers: the static member list (used when `redis_url` is None).
        redis_url: register and discover nodes in this Redis.
        cluster: name separating several rings in one Redis.
        ttl_s: a registered node not heard from for this long is dropped.
        heartbeat_s: how often a registered node renews its entry.
        kubernetes_selector: ``K=V[,K=V]`` labels of the cache-node pods.
        kubernetes_namespace: their namespace (default: this pod's own, else ``default``).
        kubernetes_port: their port when a pod has no ``kvgate.io/port`` annotation.
        kubernetes_api_url: an API server URL to use as is (else in-cluster
            config, else the kubeconfig).
    Returns:
        The Kubernetes pods when a selector is given, else Redis registration
        when `redis_url` is set, else the static list (possibly empty: a lone
        node registers only itself).

    Raises:
        ConfigError: a bad selector, or no Kubernetes API server configured.
    """
    if kubernetes_selector:
        from kvcache.membership.kubernetes import from_options  # only then load the Kubernetes client

        return from_options(
            selector=kubernetes_selector,
            namespace=kubernetes_namespace,
            port=kubernetes_port,
            api_url=kubernetes_api_url,
        )
    if redis_url:
        return RedisMembership(redis_url, cluster=cluster, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
    return StaticMembership(peers)


__all__ = ["Membership", "RedisMembership", "StaticMembership", "make_membership"]
