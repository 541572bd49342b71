"""Settings of a tiered KV cache, grouped by tier, and their parsing.

The vLLM connector reads them from ``kv_connector_extra_config`` (a JSON
object); benchmarks and tests build them directly. Library code never reads
the environment: everything arrives through these values.

JSON shape (every key optional)::

    {"namespace": {"model": "tiny-llama"},
     "l1": {"capacity_bytes": 536870912, "policy": "lru"},
     "l2": {"peers": ["a=127.0.0.1:7001?host=h1"], "membership_url": null,
            "cluster": "default", "replicas": 1, "timeout_s": 1.0},
     "l3": {"kind": "redis", "url": "redis://127.0.0.1:6379/0"},
     "store": {"write_queue_bytes": 268435456},
     "connector": {"lookup_timeout_s": 0.5}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kvcache.client import DEFAULT_MAX_MESSAGE_BYTES
from kvcache.errors import ConfigError
from kvcache.eviction import DEFAULT_POLICY
from kvcache.ring import DEFAULT_VNODES, NodeInfo
from kvcache.store import StoreSettings

L3Kind = Literal["none", "redis", "disk"]


@dataclass(frozen=True, slots=True)
class L1Settings:
    """In-process memory tier.

    Attributes:
        capacity_bytes: byte budget (default 512 MiB); 0 turns L1 off.
        policy: eviction policy, ``lru`` (default, chosen by measurement;
            see `kvcache.eviction`) or ``s3fifo``.
    """

    capacity_bytes: int = 512 << 20
    policy: str = DEFAULT_POLICY


@dataclass(frozen=True, slots=True)
class L2Settings:
    """Cache-node tier.

    Attributes:
        peers: static members, ``[ID=]HOST:PORT[?host=H&zone=Z]`` each;
            empty with no `membership_url` turns L2 off.
        membership_url: Redis URL where nodes register (overrides `peers`).
        cluster: ring name within that Redis.
        replicas: copies of each block on distinct zones/hosts (default 1);
            must equal the nodes' ``--replicas``.
        read_fallback: extra ring nodes asked on a miss (default 1).
        vnodes: ring points per node (default 160); must equal the nodes'.
        timeout_s: deadline of one RPC (default 1 s).
        max_message_bytes: gRPC message cap (default 64 MiB).
        refresh_s: member list re-read period (default 2 s).
        suspect_s: how long a failed node is left out (default 2 s).
        kubernetes_selector: ``K=V[,K=V]`` labels of the cache-node pods; when
            set, members are those pods (overrides `membership_url` and `peers`).
        kubernetes_namespace: their namespace (default: this pod's own, else ``default``).
        kubernetes_port: their gRPC port when a pod has no ``kvgate.io/port``
            annotation (default 0: the annotation is required).
    """

    peers: tuple[str, ...] = ()
    membership_url: str | None = None
    cluster: str = "default"
    replicas: int = 1
    read_fallback: int = 1
    vnodes: int = DEFAULT_VNODES
    timeout_s: float = 1.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    refresh_s: float = 2.0
    suspect_s: float = 2.0
    kubernetes_selector: str = ""
    kubernetes_namespace: str = ""
    kubernetes_port: int = 0

    @property
    def enabled(self) -> bool:
        """Whether any member source is configured."""
        return bool(self.peers or self.membership_url or self.kubernetes_selector)

    def nodes(self) -> list[NodeInfo]:
        """The static members, parsed.

        Raises:
            ConfigError: a malformed spec.
        """
        return [NodeInfo.parse(spec) for spec in self.peers]


@dataclass(frozen=True, slots=True)
class L3Settings:
    """Persistent tier.

    Attributes:
        kind: ``redis``, ``disk`` or ``none`` (default).
        url: Redis URL (kind ``redis``).
        prefix: Redis key prefix (default ``kvgate:kv:``).
        ttl_s: Redis expiry per block, or None.
        path: directory (kind ``disk``).
        capacity_bytes: directory byte budget (default 8 GiB).
        fsync: sync each file before acknowledging (kind ``disk``).
        timeout_s: deadline of one call (default 2 s).
    """

    kind: L3Kind = "none"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "kvgate:kv:"
    ttl_s: int | None = None
    path: str = ""
    capacity_bytes: int = 8 << 30
    fsync: bool = False
    timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """The vLLM connector's own knobs.

    Attributes:
        model: namespace model identity (default: the engine's served model
            name); engines sharing blocks must agree on it.
        lookup_timeout_s: longest the scheduler waits to learn which blocks
            exist (default 0.5 s); beyond it the request recomputes.
        load_timeout_s: longest a step waits for its blocks (default 5 s).
        save_queue_bytes: most frame bytes a worker keeps waiting to be
            stored (default 256 MiB); beyond it saves are dropped and counted.
        metrics_port: serve the worker's own metrics on this port (0: off;
            they are also exported through vLLM's ``/metrics``).
    """

    model: str = ""
    lookup_timeout_s: float = 0.5
    load_timeout_s: float = 5.0
    save_queue_bytes: int = 256 << 20
    metrics_port: int = 0


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Everything a tiered cache needs, by tier."""

    l1: L1Settings = field(default_factory=L1Settings)
    l2: L2Settings = field(default_factory=L2Settings)
    l3: L3Settings = field(default_factory=L3Settings)
    store: StoreSettings = field(default_factory=StoreSettings)
    connector: ConnectorSettings = field(default_factory=ConnectorSettings)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> CacheSettings:
        """Parse the JSON shape in this module's docstring.

        Raises:
            ConfigError: an unknown section or key, or a value of the wrong type.
        """
        data = dict(data or {})
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        built: dict[str, Any] = {}
        for name, value in data.items():
            if name not in sections:
                raise ConfigError(f"unknown cache settings section {name!r}; known: {sorted(sections)}")
            if not isinstance(value, Mapping):
                raise ConfigError(f"cache settings section {name!r} must be an object")
            built[name] = _section(_SECTION_TYPES[name], value, name)
        return cls(**built)


_SECTION_TYPES: dict[str, type] = {
    "l1": L1Settings,
    "l2": L2Settings,
    "l3": L3Settings,
    "store": StoreSettings,
    "connector": ConnectorSettings,
}


def _section(kind: type, values: Mapping[str, Any], name: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(kind)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key {name}.{key}; known: {sorted(known)}")
        default = known[key].default
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [part for part in value.split(",") if part.strip()]
            value = tuple(value)
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int) and value is not None:
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        kwargs[key] = value
    if name == "l3" and kwargs.get("kind", "none") not in ("none", "redis", "disk"):
        raise ConfigError(f"l3.kind must be none, redis or disk, got {kwargs['kind']!r}")
    return kind(**kwargs)
