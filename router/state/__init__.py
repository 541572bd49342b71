"""Routing state shared by gateway replicas, chosen by the store's URL scheme.

`open_state(settings.state, registry)` gives `LocalState` without a URL (one
replica alone) and `RedisState` for `redis://` and `rediss://` URLs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from router.settings import SettingsError, StateSettings
from router.state.base import FleetView, RoutingState
from router.state.local import LocalState

SCHEMES = ("redis", "rediss", "unix")


def open_state(settings: StateSettings, registry: CollectorRegistry) -> RoutingState:
    """The routing state `settings` names.

    Raises:
        SettingsError: a URL of a scheme no implementation serves.
    """
    if not settings.url:
        return LocalState()
    scheme = settings.url.partition("://")[0]
    if scheme not in SCHEMES:
        raise SettingsError(f"state.url {settings.url!r}: expected a redis:// URL")
    from router.state.redis import RedisState

    return RedisState(settings, registry=registry)


__all__ = ["FleetView", "LocalState", "RoutingState", "open_state"]
