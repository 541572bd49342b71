"""Settings of a tiered KV cache, grouped by tier, and their parsing.

The vLLM connector reads them from ``kv_connector_extra_config`` (a JSON
object); benchmarks and tests build them directly. Library code never reads
the environment: everything arrives through these values.

JSON shape (every key optional)::

    {"l1": {"capacity_bytes": 536870912, "policy": "lru"},
     "l2": {"peers": ["a=127.0.0.1:7001?host=h1"], "membership_url": null,
            "cluster": "default", "replicas": 1, "timeout_s": 1.0,
            "token_file": "/etc/kvgate/cache.token", "tls_ca_file": ""},
     "l3": {"kind": "redis", "url": "redis://127.0.0.1:6379/0", "ttl_s": 86400,
            "unbounded": "warn"},
     "store": {"write_queue_bytes": 268435456},
     "connector": {"model": "tiny-llama", "lookup_timeout_s": 0.5}}

Values are parsed by the field's type: numbers and flags may come as strings
(``"0.5"``, ``"false"``, ``"off"``), lists as comma-separated strings;
anything else of the wrong type, negative or not finite is a `ConfigError`
naming the key, never a ValueError or a silently wrong value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

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
        token: the token sent to the nodes (`kvcache.auth`): the cluster's,
            or a tenant's. Prefer `token_file`, which keeps it off command
            lines. Default: none (the nodes must be open).
        token_file: file holding the token (read at start-up); wins over `token`.
        tls_ca_file: PEM roots to verify the nodes' TLS certificates with;
            empty (default) speaks plain TCP.
        tls_server_name: the name the nodes' certificates carry, when it is
            not the host of their address.
        data_plane: move frames over the nodes' framed data ports
            (`kvcache.datapath`) when they serve one (default true: about
            half gRPC's CPU per byte moved, see kvcache/README.md, "L2
            throughput"); never with TLS. False keeps every call on gRPC.
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
    token: str = field(default="", repr=False)
    token_file: str = ""
    tls_ca_file: str = ""
    tls_server_name: str = ""
    data_plane: bool = True

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
        ttl_s: Redis expiry of each block in seconds (default 86400, one
            day), renewed when the block is read; 0 or null: none. It keeps L3
            from growing without end on a Redis without ``maxmemory``, and
            lets ``volatile-*`` eviction policies evict blocks.
        unbounded: what to do at start-up when the Redis could grow until it
            runs out of memory or refuse writes when full (no ``maxmemory``,
            the ``noeviction`` policy, or a ``volatile-*`` policy with no
            TTL): ``warn`` (default, logged once) or ``refuse`` (the engine
            does not start).
        path: directory (kind ``disk``).
        capacity_bytes: directory byte budget (default 8 GiB).
        fsync: sync each file before acknowledging (kind ``disk``).
        timeout_s: deadline of one call (default 2 s).
    """

    kind: L3Kind = "none"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "kvgate:kv:"
    ttl_s: float | None = 86400.0
    unbounded: Literal["warn", "refuse"] = "warn"
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
    def from_mapping(cls, data: Mapping[str, Any] | str | bytes | None) -> CacheSettings:
        """Parse the JSON shape in this module's docstring.

        Args:
            data: the object, or its JSON text. Numbers and flags may be
                given as strings (``"1024"``, ``"0.5"``, ``"false"``).

        Raises:
            ConfigError: not an object, an unknown section or key, or a
                value of the wrong type or out of range.
        """
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ConfigError(f"cache settings are not valid JSON: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"cache settings must be a JSON object, got {type(data).__name__}")
        data = dict(data)
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


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    else:
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if number < 0:
        raise ConfigError(f"{where} must not be negative, got {number}")
    return number


def _real(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{where} must be a finite number, not negative, got {value!r}")
    return number


def _value(hint: Any, value: Any, where: str) -> Any:
    """`value` parsed as the field's type says (strings accepted for numbers and flags).

    Raises:
        ConfigError: a value that is not of that type.
    """
    if get_origin(hint) in (Union, types.UnionType):
        options = [arg for arg in get_args(hint) if arg is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        hint = options[0]
    if get_origin(hint) is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where} must be one of {list(get_args(hint))}, got {value!r}")
        return value
    if hint is bool:
        return _boolean(value, where)
    if hint is int:
        return _integer(value, where)
    if hint is float:
        return _real(value, where)
    if get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where} must be a list of strings or a comma-separated string, got {value!r}")
        return tuple(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")  # pragma: no cover - a new field type


def _section(kind: type, values: Mapping[str, Any], name: str) -> Any:
    hints = get_type_hints(kind)
    known = {f.name for f in dataclasses.fields(kind)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key {name}.{key}; known: {sorted(known)}")
        kwargs[key] = _value(hints[key], value, f"{name}.{key}")
    return kind(**kwargs)
