"""Pod discovery implementations, by name. Kubernetes endpoints discovery plugs in beside `static`."""

from router.discovery.base import Discovery, OnChange
from router.discovery.static import StaticDiscovery

__all__ = ["Discovery", "OnChange", "StaticDiscovery"]
