"""Pods: what the gateway knows about each vLLM engine behind it.

A `Pod` holds the gateway's own accounting (in-flight requests, prefill tokens
it has sent that the pod has not yet answered) next to what the pod reports
about itself (scraped from its /metrics) and what health probes say. The
`PodSet` is the table of them; discovery adds and removes pods, the monitor
updates them, the router reads them. Nothing here does I/O.

A pod of a `PodSet` tells the set's watchers (the router's load ordering,
`router.fleet_order`) when a field routing reads is assigned (its counts,
health, models, scraped figures or peers' load object), so orderings of the
fleet stay current without every writer knowing of them. Writers that change
a nested object in place (the peers' ledger) call `Pod.touch`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NewType

PodId = NewType("PodId", str)
UserId = NewType("UserId", str)


@dataclass(frozen=True, slots=True)
class PodEndpoint:
    """Where discovery found a pod: its base URL, identity and KV event endpoint.

    Attributes:
        url: the engine's base URL, e.g. ``http://10.0.0.7:8000``.
        uid: the pod's identity when the source has one (a Kubernetes UID); a
            new pod that reuses an address is then a different pod, with an
            empty prefix-index entry.
        kv_events: the engine's ZMQ endpoint for KV events, if it publishes.
        name: a readable name for logs (the Kubernetes pod name).
    """

    url: str
    uid: str | None = None
    kv_events: str | None = None
    name: str | None = None

    @classmethod
    def of(cls, url: str) -> PodEndpoint:
        """A pod known only by its URL (static discovery)."""
        return cls(url.rstrip("/"))

    @property
    def id(self) -> PodId:
        """The pod's key: its URL, tagged with the start of its UID when it has one.

        NOTE: the URL stays in front so metric labels and logs read as
        addresses; eight hex digits of the UID tell apart pods that reused an
        address, which is all the tag must do.
        """
        return PodId(self.url if self.uid is None else f"{self.url}#{self.uid[:8]}")


@dataclass(slots=True)
class EngineStats:
    """The pod's own figures, from its last /metrics scrape."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    external_queries: float = 0.0
    external_hits: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    started_at: float | None = None
    """The engine process's start (`process_start_time_seconds`, Unix seconds), where it exports it."""
    ttft_sum: float = 0.0
    """Seconds summed over the engine's time-to-first-token histogram (`vllm:time_to_first_token_seconds_sum`)."""
    ttft_count: float = 0.0
    """First tokens the engine has timed (`vllm:time_to_first_token_seconds_count`)."""
    cached_by_source: dict[str, float] = field(default_factory=dict)
    """Cached prompt tokens by the tier that supplied them (`vllm:prompt_tokens_cached_by_source`)."""
    computed_tokens: float = 0.0
    """Prompt tokens the engine computed itself (`vllm:prompt_tokens_by_source_total{source="local_compute"}`)."""
    prefill_seconds: float = 0.0
    prefill_requests: float = 0.0
    """Sum and count of `vllm:request_prefill_time_seconds` (scheduled to first token, loads included)."""
    scraped_at: float = 0.0
    gateway_in_flight: int = 0
    """The gateways' own requests on the pod (`Pod.fleet_in_flight`) when these figures were read."""

    @property
    def others(self) -> int:
        """Requests on the engine no gateway of this fleet sent: running + waiting beyond the gateways' own then.

        The engine's counts age until the next scrape, the gateways' do not:
        what the pod carries now is the gateways' current count plus this.
        """
        return max(self.running + self.waiting - self.gateway_in_flight, 0)


@dataclass(slots=True)
class PeerLoad:
    """Work other gateway replicas have on a pod (their own counts, summed; see `router.state`)."""

    in_flight: int = 0
    pending_prefill: int = 0
    decoding: int = 0


@dataclass(slots=True, eq=False)
class Pod:
    """One engine. Mutable; only the event loop touches it."""

    id: PodId
    url: str
    healthy: bool = True
    failures: int = 0
    in_flight: int = 0
    """Requests the gateway has sent and not yet seen finish."""
    pending_prefill: int = 0
    """Uncached prompt tokens sent to the pod whose first output has not come back."""
    decoding: int = 0
    """Requests on the pod past their first output token."""
    peer: PeerLoad = field(default_factory=PeerLoad)
    """Other replicas' counts on this pod; all zero for a gateway without peers."""
    models: frozenset[str] = frozenset()
    adapters: frozenset[str] = frozenset()
    """The models that are LoRA adapters on a base model (their blocks are keyed by name)."""
    max_model_len: int | None = None
    stats: EngineStats = field(default_factory=EngineStats)
    changed_at: float = field(default_factory=time.monotonic)
    ejected: bool = False
    """Taken out of rotation by outlier detection (`router.outliers`) until a good probe re-admits it."""
    backoff_until: float = 0.0
    """`time.monotonic()` until which the pod is avoided as overloaded, if another pod can serve."""
    on_change: Callable[[Pod], None] | None = field(default=None, repr=False, compare=False)
    """Called after a field routing reads is assigned (set by `PodSet`)."""

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in _ROUTING_FIELDS:
            # NOTE: the hook is set last in __init__; until then there is no watcher.
            watcher = getattr(self, "on_change", None)
            if watcher is not None:
                watcher(self)

    def touch(self) -> None:
        """Tell the watchers that something routing reads changed in place (e.g. `peer`'s counts)."""
        if self.on_change is not None:
            self.on_change(self)

    @property
    def fleet_in_flight(self) -> int:
        """Requests in flight on the pod from every gateway replica."""
        return self.in_flight + self.peer.in_flight

    @property
    def fleet_pending_prefill(self) -> int:
        """Uncached prompt tokens queued on the pod by every gateway replica."""
        return self.pending_prefill + self.peer.pending_prefill

    @property
    def fleet_decoding(self) -> int:
        """Requests past their first token on the pod, from every gateway replica."""
        return self.decoding + self.peer.decoding

    @property
    def load(self) -> int:
        """Requests on the pod now: every gateway replica's, plus others' as the engine last reported them."""
        return self.fleet_in_flight + self.stats.others


#: The fields whose assignment can change a routing decision.
_ROUTING_FIELDS = frozenset(
    {
        "healthy", "ejected", "backoff_until", "in_flight", "pending_prefill", "decoding", "peer",
        "models", "adapters", "max_model_len", "stats",
    }
)  # fmt: skip


def lora_adapters(served: Iterable[object]) -> frozenset[str]:
    """The LoRA adapters among a pod's `/v1/models` entries.

    vLLM lists an adapter with its base model as `parent`; a base model has
    no parent. (`root` does not tell them apart: a base model's root is its
    path, which differs from a served model name too.)

    Args:
        served: the `data` entries of a `/v1/models` answer.

    Returns:
        The adapters' model ids.
    """
    return frozenset(
        m["id"]
        for m in served
        if isinstance(m, dict)
        and isinstance(m.get("id"), str)
        and isinstance(m.get("parent"), str)
        and m["parent"] != m["id"]
    )


class PodSet:
    """The pods the gateway routes to, keyed by id (`PodEndpoint.id`: the base URL, tagged with the UID when known)."""

    def __init__(self, urls: Iterable[str] = ()) -> None:
        self._pods: dict[PodId, Pod] = {}
        self._watchers: list[Callable[[Pod], None]] = []
        # What each pod lists, counted, so a request's model is checked without visiting every pod.
        self._listed: dict[Pod, tuple[frozenset[str], frozenset[str]]] = {}
        self._models: Counter[str] = Counter()
        self._adapters: Counter[str] = Counter()
        # Healthy pods' context lengths per model, counted, for the same reason.
        self._context: dict[Pod, tuple[frozenset[str], int]] = {}
        self._lengths: dict[str, Counter[int]] = {}
        for url in urls:
            self.add(url)

    def watch(self, callback: Callable[[Pod], None]) -> None:
        """Call `callback(pod)` whenever a pod joins, leaves, or a field routing reads changes.

        Args:
            callback: must be cheap and must not mutate pods (it is called
                from inside attribute assignment).
        """
        self._watchers.append(callback)

    def serves(self, model: str) -> bool:
        """Whether any pod in the table lists `model` (healthy or not). O(1)."""
        return model in self._models

    def is_adapter(self, model: str) -> bool:
        """Whether any pod lists `model` as a LoRA adapter. O(1)."""
        return model in self._adapters

    def max_model_len(self, model: str) -> int | None:
        """The longest context a healthy pod serving `model` reports, or None. O(distinct lengths)."""
        lengths = self._lengths.get(model)
        return max(lengths) if lengths else None

    def model_names(self) -> list[str]:
        """Every model some pod lists, sorted."""
        return sorted(self._models)

    def _changed(self, pod: Pod) -> None:
        listed = (pod.models, pod.adapters) if self._pods.get(pod.id) is pod else (frozenset(), frozenset())
        old = self._listed.get(pod)
        if old is None or old[0] is not listed[0] or old[1] is not listed[1]:
            self._relist(pod, old, listed)
        self._recount_context(pod)
        for callback in self._watchers:
            callback(pod)

    def _relist(
        self, pod: Pod, old: tuple[frozenset[str], frozenset[str]] | None, new: tuple[frozenset[str], frozenset[str]]
    ) -> None:
        before = old or (frozenset(), frozenset())
        for counts, was, now in ((self._models, before[0], new[0]), (self._adapters, before[1], new[1])):
            for name in was - now:
                counts[name] -= 1
                if counts[name] <= 0:
                    del counts[name]
            for name in now - was:
                counts[name] += 1
        if new[0] or new[1]:
            self._listed[pod] = new
        else:
            self._listed.pop(pod, None)

    def _recount_context(self, pod: Pod) -> None:
        length = pod.max_model_len
        serving = self._pods.get(pod.id) is pod and pod.healthy and type(length) is int
        new = (pod.models, length) if serving else None
        old = self._context.get(pod)
        if old == new:
            return
        if old is not None:
            for model in old[0]:
                counts = self._lengths[model]
                counts[old[1]] -= 1
                if counts[old[1]] <= 0:
                    del counts[old[1]]
                if not counts:
                    del self._lengths[model]
            del self._context[pod]
        if new is not None:
            for model in new[0]:
                self._lengths.setdefault(model, Counter())[new[1]] += 1
            self._context[pod] = new

    def add(self, url: str, *, pod_id: PodId | None = None) -> Pod:
        """Add a pod (idempotent). Returns the pod.

        Args:
            url: the pod's base URL.
            pod_id: its key; the URL when None.
        """
        url = url.rstrip("/")
        pod_id = pod_id or PodId(url)
        pod = self._pods.get(pod_id)
        if pod is None:
            pod = self._pods[pod_id] = Pod(id=pod_id, url=url)
            pod.on_change = self._changed
            self._changed(pod)
        return pod

    def remove(self, pod_id: PodId) -> Pod | None:
        pod = self._pods.pop(pod_id, None)
        if pod is not None:
            self._changed(pod)
            pod.on_change = None
        return pod

    def get(self, pod_id: PodId) -> Pod | None:
        return self._pods.get(pod_id)

    def __iter__(self) -> Iterator[Pod]:
        return iter(self._pods.values())

    def __len__(self) -> int:
        return len(self._pods)

    def healthy(self) -> list[Pod]:
        return [p for p in self._pods.values() if p.healthy]

    def models(self) -> dict[str, list[Pod]]:
        """Model name -> healthy pods serving it."""
        served: dict[str, list[Pod]] = {}
        for pod in self.healthy():
            for model in pod.models:
                served.setdefault(model, []).append(pod)
        return served
