"""Pod discovery implementations, picked by name (`discovery.kind`).

`static` serves the pods named by `--worker-urls`; `kubernetes` watches the
pods that match a label selector (`--service-discovery`). The gateway only
sees the `Discovery` protocol. The Kubernetes client is imported when that
implementation is chosen, so a static gateway never loads it.
"""

from __future__ import annotations

from collections.abc import Callable

from router.discovery.base import Discovery, OnChange
from router.discovery.static import StaticDiscovery
from router.settings import DiscoverySettings


def _static(settings: DiscoverySettings) -> Discovery:
    if not settings.worker_urls:
        raise ValueError("no pods: give --worker-urls (or discovery.worker_urls), or --service-discovery")
    return StaticDiscovery(settings.worker_urls)


def _kubernetes(settings: DiscoverySettings) -> Discovery:
    from router.discovery.kubernetes import KubernetesDiscovery

    return KubernetesDiscovery.from_settings(settings)


#: Discovery kind -> factory from the `discovery` settings group.
KINDS: dict[str, Callable[[DiscoverySettings], Discovery]] = {"static": _static, "kubernetes": _kubernetes}


def make_discovery(settings: DiscoverySettings) -> Discovery:
    """The discovery `settings.kind` names, built from the settings.

    Raises:
        ValueError: an unknown kind, or settings that kind cannot use (no
            worker URLs, no selector, no reachable Kubernetes configuration).
    """
    try:
        factory = KINDS[settings.kind]
    except KeyError:
        raise ValueError(f"unknown discovery kind {settings.kind!r}; known: {', '.join(sorted(KINDS))}") from None
    return factory(settings)


__all__ = ["KINDS", "Discovery", "OnChange", "StaticDiscovery", "make_discovery"]
