"""Pods: what the gateway knows about each vLLM engine behind it.

A `Pod` holds the gateway's own accounting (in-flight requests, prefill tokens
it has sent that the pod has not yet answered) next to what the pod reports
about itself (scraped from its /metrics) and what health probes say. The
`PodSet` is the table of them; discovery adds and removes pods, the monitor
updates them, the router reads them. Nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NewType

PodId = NewType("PodId", str)
UserId = NewType("UserId", str)


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
    cached_by_source: dict[str, float] = field(default_factory=dict)
    """Cached prompt tokens by the tier that supplied them (`vllm:prompt_tokens_cached_by_source`)."""
    scraped_at: float = 0.0


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
    models: frozenset[str] = frozenset()
    max_model_len: int | None = None
    stats: EngineStats = field(default_factory=EngineStats)
    changed_at: float = field(default_factory=time.monotonic)


class PodSet:
    """The pods the gateway routes to, keyed by id (the base URL)."""

    def __init__(self, urls: Iterable[str] = ()) -> None:
        self._pods: dict[PodId, Pod] = {}
        for url in urls:
            self.add(url)

    def add(self, url: str) -> Pod:
        """Add a pod (idempotent). Returns the pod."""
        url = url.rstrip("/")
        pod_id = PodId(url)
        pod = self._pods.get(pod_id)
        if pod is None:
            pod = self._pods[pod_id] = Pod(id=pod_id, url=url)
        return pod

    def remove(self, pod_id: PodId) -> Pod | None:
        return self._pods.pop(pod_id, None)

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
