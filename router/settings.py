"""Gateway settings: grouped dataclasses, loaded from YAML and overridden by flags.

Each field's comment gives its unit, default and why. The CLI (`router.server`)
is the only reader of files and flags; everything else receives a `Settings`.

YAML shape (every key optional)::

    server:    {host: 0.0.0.0, port: 8000, api_keys: [...], drain_grace_s: 30}
    discovery: {worker_urls: [http://pod-a:8000, ...], health_interval_s: 2,
                kv_event_sources: ["http://pod-a:8000=tcp://pod-a:5557"]}
    routing:   {policy: kv-aware, tokenizer: ./model, block_size: 128}
    admission: {max_inflight_per_pod: 32, max_queue: 1024}
    upstream:  {connect_timeout_s: 2, retries: 2}
    outliers:  {consecutive_failures: 3, base_ejection_s: 10, max_ejection_share: 0.5}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    """Address to bind. Default loopback; use 0.0.0.0 in a container."""
    port: int = 8000
    """TCP port; 0 picks a free one (tests)."""
    api_keys: tuple[str, ...] = ()
    """Bearer tokens accepted; empty means no authentication (the engines behind are private)."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted, in bytes; larger answers 413. 8 MiB fits any prompt a pod can hold."""
    max_tokens_limit: int = 1_000_000
    """Largest `max_tokens` accepted before asking a pod; larger answers 400 at once."""
    drain_grace_s: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM before the gateway exits."""


@dataclass(slots=True)
class DiscoverySettings:
    worker_urls: tuple[str, ...] = ()
    """Base URLs of the vLLM pods (static discovery)."""
    health_interval_s: float = 2.0
    """Seconds between health probes of each pod."""
    unhealthy_after: int = 2
    """Consecutive failed probes (or proxied connection failures) that take a pod out."""
    probe_timeout_s: float = 2.0
    """Timeout of one probe, in seconds."""
    kv_event_sources: tuple[str, ...] = ()
    """`POD_URL=ZMQ_ENDPOINT` pairs: pods whose vLLM KV events confirm the prefix index."""


@dataclass(slots=True)
class ScrapeSettings:
    interval_s: float = 0.5
    """Seconds between scrapes of each pod's /metrics: running, waiting, KV usage, prefix hits."""


@dataclass(slots=True)
class RoutingSettings:
    policy: str = "kv-aware"
    """Default policy name or weighted mix (`prefix-cache:2,least-request:1`); header x-routing-strategy overrides."""
    tokenizer: Path | None = None
    """Model directory with tokenizer.json and the chat template; without it prompts are matched as UTF-8 bytes."""
    block_size: int = 128
    """Tokens per KV block until the pods report theirs (vLLM's CPU default is 128)."""
    default_capacity_blocks: int = 4096
    """KV blocks assumed per pod until `vllm:cache_config_info` reports `num_gpu_blocks`."""
    session_header: str = "x-session-id"
    """Header whose value keys the session-affinity policy."""
    imbalance_abs: int = 8
    """prefix-cache: when busiest minus idlest in-flight exceeds this, fall back to least-request."""
    prefill_tokens_per_decode: float = 32.0
    """kv-aware: cost of one running decode stream, in prompt-token equivalents of prefill work."""
    min_match_blocks: int = 1
    """kv-aware: shorter cached matches are ignored, so one shared short preamble cannot pull all traffic."""


@dataclass(slots=True)
class AdmissionSettings:
    max_inflight_per_pod: int = 64
    """Requests the gateway keeps in flight on one pod; beyond that on every pod, requests queue."""
    max_queue: int = 1024
    """Requests allowed to wait; one more answers 429."""
    queue_timeout_s: float = 60.0
    """Seconds a request may wait for a slot before answering 503."""
    input_weight: float = 1.0
    """VTC cost of one prompt token."""
    output_weight: float = 2.0
    """VTC cost of one generated token."""


@dataclass(slots=True)
class UpstreamSettings:
    connect_timeout_s: float = 3.0
    """Seconds to open a connection to a pod."""
    first_byte_timeout_s: float = 600.0
    """Seconds a pod may take before its first response byte (queued prefill included)."""
    read_timeout_s: float = 120.0
    """Seconds of silence allowed between two chunks of a streamed answer."""
    retries: int = 2
    """Other pods tried when a pod cannot be reached before any byte reached the client."""


@dataclass(slots=True)
class OutlierSettings:
    """Passive outlier detection, as Envoy's: what requests tell about a pod between health probes.

    A pod that answers 429 or 503 is overloaded, not broken: it is avoided for
    a short backoff and keeps its cache and its place. A pod whose requests
    fail (connection errors, timeouts, other 5xx) `consecutive_failures` times
    in a row is ejected for `base_ejection_s` times the number of times it was
    ejected, at most `max_ejection_s`, and re-admitted at its first good health
    probe after that. Its cached prefixes are kept throughout.
    """

    consecutive_failures: int = 3
    """Failed requests in a row that eject a pod. Default 3: Envoy's 5 suits large fleets; with a
    handful of pods each failure costs a user a retry."""
    base_ejection_s: float = 10.0
    """Seconds of the first ejection; the n-th ejection in a row lasts n times this. Default 10: a
    blip is over by then, a pod restarting gets ejected again, for longer."""
    max_ejection_s: float = 300.0
    """Longest ejection, in seconds (Envoy's default). Default 300."""
    max_ejection_share: float = 0.5
    """Largest share of the pods ejected at once (at least one of two or more, never all). Default
    0.5: failures shared by half the fleet are the gateway's or the network's, not a pod's."""
    overload_backoff_s: float = 0.5
    """Seconds an overloaded pod (429/503) is avoided after its first such answer; doubles per
    answer in a row. Default 0.5: a busy engine frees slots within a few of its steps."""
    max_overload_backoff_s: float = 8.0
    """Longest overload backoff, in seconds. Default 8: a busy pod is back in rotation within seconds of draining its queue."""


@dataclass(slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    scrape: ScrapeSettings = field(default_factory=ScrapeSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    outliers: OutlierSettings = field(default_factory=OutlierSettings)


class SettingsError(ValueError):
    """A settings file or value that cannot be used."""


def _coerce(group: Any, name: str, value: Any) -> Any:
    current = getattr(group, name)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{name}: expected a list, got {type(value).__name__}")
        return tuple(str(v) for v in value)
    if name == "tokenizer":
        return None if value is None else Path(value)
    if isinstance(current, bool) or current is None:
        return value
    if isinstance(value, bool) or (isinstance(current, int) and isinstance(value, float) and not value.is_integer()):
        raise SettingsError(f"{name}: expected {type(current).__name__}, got {value!r}")  # int() would truncate
    try:
        return type(current)(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}: expected {type(current).__name__}, got {value!r}") from exc


def apply(settings: Settings, values: dict[str, dict[str, Any]]) -> Settings:
    """Set grouped values on `settings`, checking every group and field name.

    Args:
        settings: the settings to update in place.
        values: `{group: {field: value}}`, as read from YAML or built from flags.

    Returns:
        The same `settings`, updated.

    Raises:
        SettingsError: an unknown group or field, or a value of the wrong type.
    """
    groups = {f.name for f in dataclasses.fields(Settings)}
    for group_name, group_values in values.items():
        if group_name not in groups:
            raise SettingsError(f"unknown settings group {group_name!r} (known: {sorted(groups)})")
        if not isinstance(group_values, dict):
            raise SettingsError(f"{group_name}: expected a mapping")
        group = getattr(settings, group_name)
        known = {f.name for f in dataclasses.fields(group)}
        for name, value in group_values.items():
            if name not in known:
                raise SettingsError(f"unknown setting {group_name}.{name} (known: {sorted(known)})")
            setattr(group, name, _coerce(group, name, value))
    return settings


def load(path: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Build settings from defaults, then a YAML file, then overrides (flags).

    Raises:
        SettingsError: the file is unreadable or not a mapping, or a value is bad.
    """
    settings = Settings()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise SettingsError(f"cannot read settings file {path}: not YAML{where}: {problem}") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"settings file {path} must hold a mapping")
        apply(settings, data)
    if overrides:
        apply(settings, overrides)
    return settings
