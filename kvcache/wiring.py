"""Wiring: the tiers and the tiered store that a `CacheSettings` describes.

`build_store(settings, metrics=...)` is what the vLLM connector and the
benchmarks call; `L3_KINDS` is the registry of persistent tiers by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kvcache.auth import read_token_file
from kvcache.errors import ConfigError
from kvcache.membership import make_membership
from kvcache.metrics import StoreMetrics
from kvcache.settings import CacheSettings, L3Settings
from kvcache.store import TieredStore
from kvcache.tiers import ChangeListener, DiskTier, LocalTier, PeerTier, RedisTier, Tier


def _redis(settings: L3Settings, metrics: StoreMetrics) -> Tier:
    return RedisTier(
        settings.url,
        prefix=settings.prefix.encode(),
        ttl_s=settings.ttl_s,
        unbounded=settings.unbounded,
        timeout_s=settings.timeout_s,
        metrics=metrics,
    )


def _disk(settings: L3Settings, metrics: StoreMetrics) -> Tier:
    if not settings.path:
        raise ConfigError("l3.kind=disk needs l3.path")
    return DiskTier(settings.path, settings.capacity_bytes, fsync=settings.fsync, metrics=metrics)


#: L3 kind -> constructor.
L3_KINDS: dict[str, Callable[[L3Settings, StoreMetrics], Tier]] = {"redis": _redis, "disk": _disk}


def build_tiers(
    settings: CacheSettings,
    *,
    metrics: StoreMetrics,
    l1_listener: ChangeListener | None = None,
) -> list[Tier]:
    """The tiers `settings` enables, fastest first.

    Args:
        settings: what to build.
        metrics: shared by the tiers (corrupt frames, evictions).
        l1_listener: told of every L1 change.

    Raises:
        ConfigError: inconsistent settings.
    """
    tiers: list[Tier] = []
    if settings.l1.capacity_bytes > 0:
        tiers.append(
            LocalTier(settings.l1.capacity_bytes, policy=settings.l1.policy, metrics=metrics, listener=l1_listener)
        )
    l2 = settings.l2
    if l2.enabled:
        token = read_token_file(l2.token_file) if l2.token_file else l2.token
        membership = make_membership(
            peers=l2.nodes(),
            redis_url=l2.membership_url,
            cluster=l2.cluster,
            kubernetes_selector=l2.kubernetes_selector,
            kubernetes_namespace=l2.kubernetes_namespace,
            kubernetes_port=l2.kubernetes_port,
        )
        tiers.append(
            PeerTier(
                membership,
                replicas=l2.replicas,
                read_fallback=l2.read_fallback,
                vnodes=l2.vnodes,
                timeout_s=l2.timeout_s,
                max_message_bytes=l2.max_message_bytes,
                refresh_s=l2.refresh_s,
                suspect_s=l2.suspect_s,
                token=token,
                tls_ca_file=l2.tls_ca_file,
                tls_server_name=l2.tls_server_name,
                data_plane=l2.data_plane,
                metrics=metrics,
            )
        )
    if settings.l3.kind != "none":
        try:
            factory = L3_KINDS[settings.l3.kind]
        except KeyError:
            raise ConfigError(f"unknown l3.kind {settings.l3.kind!r}; known: {sorted(L3_KINDS)}") from None
        tiers.append(factory(settings.l3, metrics))
    return tiers


def build_store(
    settings: CacheSettings,
    *,
    metrics: StoreMetrics,
    l1_listener: ChangeListener | None = None,
) -> TieredStore:
    """A `TieredStore` over the tiers `settings` enables (not started).

    L1, when enabled, is written inline; every other tier behind.

    Raises:
        ConfigError: inconsistent settings.
    """
    tiers = build_tiers(settings, metrics=metrics, l1_listener=l1_listener)
    inline = 1 if tiers and isinstance(tiers[0], LocalTier) else 0
    store_settings = dataclasses.replace(settings.store, inline_tiers=inline)
    return TieredStore(tiers, metrics=metrics, settings=store_settings)
