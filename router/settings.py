"""Gateway settings: grouped dataclasses, loaded from YAML and overridden by flags.

Each field's comment gives its unit, default and why. The CLI (`router.server`)
is the only reader of files and flags; everything else receives a `Settings`.

YAML shape (every key optional)::

    server:    {host: 0.0.0.0, port: 8000, api_keys: [...], drain_grace_s: 30,
                header_timeout_s: 10, body_timeout_s: 30, keepalive_timeout_s: 75, max_connections: 4096}
    discovery: {worker_urls: [http://pod-a:8000, ...], health_interval_s: 2,
                kv_event_sources: ["http://pod-a:8000=tcp://pod-a:5557"]}
               or {kind: kubernetes, selector: [app=vllm], namespace: llm, pod_port: 8000}
    routing:   {policy: kv-aware, tokenizer: ./model, block_size: 128}
    admission: {max_inflight_per_pod: 64, adaptive: true, max_queue: 1024}
    upstream:  {connect_timeout_s: 3, first_byte_timeout_s: 60, read_timeout_s: 30,
                min_decode_tokens_per_s: 10, max_answer_s: 600, max_answer_bytes: 67108864, retries: 2}
    state:     {url: redis://127.0.0.1:6379/0, lease_s: 3}
    outliers:  {consecutive_failures: 3, base_ejection_s: 10, max_ejection_share: 0.5}
    shared_tier: {mode: auto, feed: events, capacity_blocks: 262144, load_ratio_prior: 0.1}
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
    """Seconds in-flight requests get to finish after SIGTERM before the gateway exits.

    New requests meanwhile answer 503 (with `Retry-After` and `Connection: close`)."""
    header_timeout_s: float = 10.0
    """Seconds a client may take to send a request's line and headers, from its first byte.

    Default 10 s: a real client sends its headers in one write; one that trickles them holds
    a connection for nothing (nginx's `client_header_timeout` plays this part)."""
    body_timeout_s: float = 30.0
    """Seconds a client may take to send a request's whole body; slower gets 408 and is closed.

    Default 30 s: the largest body (`max_body_bytes`) at 2 Mbit/s. A body still arriving is not
    counted in flight, so it never holds a drain."""
    keepalive_timeout_s: float = 75.0
    """Seconds an idle keep-alive connection (or one that has sent nothing yet) stays open.

    Default 75 s: longer than the 60 s idle timeout of common load balancers, so the gateway is
    not the side that closes a connection they are about to reuse."""
    cpu_priority: str = "realtime"
    """How `kvgate serve` asks to be scheduled beside busy engines on its host (`router.cpu_priority`):
    `realtime` (SCHED_RR, falling back to `high` when refused), `high` (nice -10) or `normal`.

    Default `realtime`: the gateway needs a few ms of CPU per request, but every wait for a core
    is added to a first token; without CAP_SYS_NICE it runs as started."""
    max_connections: int = 4096
    """Client connections open at once; one more gets a 503 and is closed at once.

    Default 4096: well above `max_inflight_per_pod` x pods + `max_queue` for a few pods. The
    process needs as many file descriptors (`ulimit -n`) plus its pod connections."""


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
    kind: str = "static"
    """Where pods come from: `static` (`worker_urls`) or `kubernetes` (a pod watch; `--service-discovery`)."""
    selector: tuple[str, ...] = ()
    """kubernetes: `KEY=VALUE` labels a pod must carry (all of them; `a=b,c=d` also works in one item)."""
    namespace: str = ""
    """kubernetes: namespace whose pods are watched; empty means the gateway's own (in a pod), else `default`."""
    pod_port: int = 8000
    """kubernetes: engine port of pods without a `kvgate.io/port` annotation (vLLM's default, 8000)."""
    kubernetes_api_url: str = ""
    """kubernetes: API server URL to use as is (tests, `kubectl proxy`); empty means in-cluster config, else KUBECONFIG."""
    watch_timeout_s: float = 300.0
    """kubernetes: seconds before a pod watch is re-opened from its resourceVersion (the API server caps them too)."""
    retry_backoff_s: float = 1.0
    """kubernetes: seconds to wait after a failed list or watch; doubles on each failure, up to 30."""


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
    prefill_delay_weight: float = 1.0
    """kv-aware: weight of the delay a request's prefill adds to each other request on the pod (0: price only its own wait)."""
    queued_prefill_weight: float = 1.0
    """kv-aware: weight of the uncached prompt work already queued on a pod (1: the request waits for all of it)."""
    prefix_copy_weight: float = 1.0
    """kv-aware: a prefix another pod holds, made again on a pod that lacks it, costs this many times its work more."""
    min_match_blocks: int = 1
    """kv-aware: shorter cached matches are ignored, so one shared short preamble cannot pull all traffic."""
    decision_log: Path | None = None
    """File to append every routing decision to, one JSON line each (candidates, their costs and
    matched blocks, the choice, whether the request waited for it); None (default): off. For
    finding out why prompts missed their cached prefixes over a whole run (`router.decisions`)."""


@dataclass(slots=True)
class SharedTierSettings:
    """Whether and how kv-aware prices blocks the shared KV cache can load."""

    mode: str = "auto"
    """`auto`: a pod counts as loading from the shared cache once it reports external prefix-cache
    queries (`vllm:external_prefix_cache_queries_total` > 0), and a pod that has not answered any
    prompt yet counts as its peers do; `on`: every pod (`kvgate up` wires every engine to the cache);
    `off`: never (the cost is the GPU-only one)."""
    feed: str = "events"
    """What the belief of the shared cache's contents is built from: `events` (blocks engines
    reported storing), `decisions` (prompts routed), `both`. Default `events` (which falls back to
    `decisions` while no engine sends KV events): routed prompts are counted before they are
    computed and saved, so a burst on one prefix believes blocks loadable that are still being
    computed (see the README's measurement)."""
    capacity_blocks: int = 262_144
    """Blocks the belief keeps, least recently stored forgotten first (about 100 bytes each).
    Default 262,144: at 128 tokens a block, 33M tokens, more than the L2 nodes of a small fleet hold
    (L3 keeps more, but forgetting only makes the router price a load as a prefill)."""
    load_ratio_prior: float = 0.1
    """Cost of loading one token relative to computing it, until engines' figures say otherwise.
    Default 0.1: 3,000 tokens loaded from L2 in 0.11 s against 1.15 s computed, on vLLM CPU."""


@dataclass(slots=True)
class AdmissionSettings:
    """How many requests each pod gets at once, and how the others wait (`router.concurrency`, `router.admission`).

    With `adaptive` on (the default) each pod's limit follows what its engine reports: it
    shrinks while the engine holds requests waiting, its KV cache is nearly full or its time
    to first token rises, and grows while the engine keeps up, so requests beyond what the
    engines can run wait at the gateway, in VTC order, instead of first-come first-served
    inside the engines, when their user has been served more than others (a user level with
    the others, or alone, is held only to the cap). `max_inflight_per_pod` caps it; with
    `adaptive` off it is the limit for every request.
    """

    max_inflight_per_pod: int = 64
    """Requests the gateway keeps in flight on one pod at most; beyond each pod's limit, requests queue.

    Default 64: a cap above what a vLLM engine runs well at once; the adaptive limit stays under it."""
    adaptive: bool = True
    """Whether each pod's limit follows its engine's figures (True) or is `max_inflight_per_pod` (False)."""
    min_inflight_per_pod: int = 1
    """Least adaptive limit. Default 1: an engine that cannot run two requests at once still runs one."""
    engine_waiting_allowed: int = 0
    """Requests an engine may report waiting before its limit shrinks.

    Default 0: a request the engine cannot start at once waits first-come first-served inside
    it; held at the gateway it would wait in VTC order for the same time."""
    kv_usage_high: float = 0.95
    """Engine KV cache usage (a fraction) at or above which the limit shrinks.

    Default 0.95: a nearly full cache makes the engine queue or preempt the next request."""
    ttft_tolerance: float = 3.0
    """How many times its floor the time to first token per token of prefill work may reach before the limit shrinks.

    Default 3: read per token of work (`router.concurrency`), TTFT still varies by up to 2x between
    quiet intervals (a full cache hit is mostly fixed cost); a rise past 3x is queueing."""
    ttft_floor_drift: float = 0.01
    """Relative rise of that floor per evaluation (per scrape), so it follows a mix that got slower.

    Default 0.01: the floor doubles in about 70 evaluations (35 s at the default scrape interval)."""
    limit_backoff: float = 0.9
    """Factor the limit shrinks by at least when the engine is congested. Default 0.9 (as AIMD limiters use)."""
    hold_for_return_s: float = 0.1
    """Seconds a freed slot is kept for its user's next request while others wait (`router.slot_holds`).

    Only for a user that would be served before every waiter and whose last request came this
    soon after the one before ended (a closed loop). Default 0.1: a client's next request
    reaches the gateway's queue within tens of milliseconds on a loaded host; 0 turns it off."""
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
    """How long and how much the gateway waits for and takes from a pod.

    NOTE: a non-streamed vLLM answer sends nothing until the last token, so no silence
    timeout can tell a hung pod from a long answer. Its budget therefore scales with what
    was asked: `first_byte_timeout_s + max_tokens / min_decode_tokens_per_s`, capped by
    `max_answer_s` (which is also the budget when `max_tokens` is not given). Asking the pod
    for a stream and rebuilding the answer would allow a silence timeout, but the gateway
    would then re-create vLLM's JSON (choices, logprobs, tool calls) instead of relaying the
    pod's bytes; the budget keeps the answer exactly as the pod wrote it. Streams send
    as they generate, so they get a deadline for the first chunk and one per silence after.
    With the defaults a pod that hangs costs 60 s while a stream waits for its headers or
    first chunk, 30 s once it streams, and 60 s + max_tokens / 10 not streaming (62 s for
    16 tokens).
    """

    connect_timeout_s: float = 3.0
    """Seconds to open a connection to a pod. Default 3 s: pods are on the same network."""
    first_byte_timeout_s: float = 60.0
    """Seconds for a pod's response headers, and then for a stream's first chunk.

    Covers queueing and prefill at the pod. Default 60 s: a long prompt's prefill takes
    seconds on a GPU; the gateway's admission queue (not the pod's) absorbs load."""
    read_timeout_s: float = 30.0
    """Seconds of silence allowed between two chunks of a stream once it has begun.

    Default 30 s: a healthy pod sends a token every few tens of milliseconds."""
    min_decode_tokens_per_s: float = 10.0
    """Slowest generation rate (tokens/s per request) a healthy pod is assumed to keep.

    Sizes a non-streamed answer's budget. Default 10: slower than a loaded GPU pod."""
    max_answer_s: float = 600.0
    """Cap of a non-streamed answer's budget, in seconds, and its budget without `max_tokens`."""
    max_answer_bytes: int = 64 * 1024 * 1024
    """Largest non-streamed answer taken from a pod, in bytes; larger fails with a 502.

    Default 64 MiB: far above any completion's JSON, small enough that a broken pod cannot
    bloat the gateway. Streams are not bounded in total, only per event."""
    max_event_bytes: int = 4 * 1024 * 1024
    """Largest single server-sent event taken from a pod's stream, in bytes.

    An incomplete event is held until its end arrives; a larger one ends the stream with an
    error event. Default 4 MiB: a chunk with logprobs of many choices stays far below."""
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
class StateSettings:
    url: str | None = None
    """`redis://HOST:PORT/DB` shared by gateway replicas so they route as one; None: this replica alone."""
    cluster: str = "default"
    """Name of the replica group in the store; replicas with the same name share state."""
    lease_s: float = 3.0
    """Seconds a replica's load outlives it: a replica that stops renewing is dropped by the others after this."""
    flush_timeout_s: float = 0.05
    """Seconds a request may wait to write its reservation when the store stopped reading (socket buffers full);
    past that the store counts as down; also the longest an answer's end waits for the store to have its release."""
    batch_linger_s: float = 0.002
    """Seconds a first token or fairness update (a user's counter or activity) may wait to share the next write."""
    warmup_timeout_s: float = 5.0
    """Seconds a starting replica waits for the store before routing on its own state."""
    warmup_entries: int = 20_000
    """Recent stream entries a starting replica reads back to learn the peers' placements."""
    stream_max_entries: int = 100_000
    """Entries the shared stream keeps (approximate trim); bounds the store's memory."""


@dataclass(slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    scrape: ScrapeSettings = field(default_factory=ScrapeSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    state: StateSettings = field(default_factory=StateSettings)
    outliers: OutlierSettings = field(default_factory=OutlierSettings)
    shared_tier: SharedTierSettings = field(default_factory=SharedTierSettings)


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
    if name in ("tokenizer", "decision_log"):
        return None if value is None else Path(value)
    if name == "url" and (value is None or isinstance(value, str)):
        return value
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
