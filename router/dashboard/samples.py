"""The live page's memory: a ring buffer of the gateway's figures, one sample per interval.

`Sampler.run` wakes every `interval_s` and records a `Sample`: per pod the
engine's cumulative prefix-cache counters and cached tokens by tier (as the
monitor last scraped them), the router's predicted hit tokens and routed
prompt tokens (read from the gateway's own metrics registry), and load. The
buffer holds `window_s` of history; `router.dashboard.data` turns consecutive
samples into rates.

Not here: HTTP (`router.dashboard`), or the rates and JSON (`.data`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from router.gateway import Gateway

#: Gateway counters sampled per pod: field of `PodSample` -> the `GatewayMetrics` counter.
_PER_POD = {"predicted": "predicted_hit_tokens", "routed": "prompt_tokens"}


@dataclass(frozen=True, slots=True)
class PodSample:
    """One pod's cumulative counters and load at one instant."""

    prefix_queries: float
    prefix_hits: float
    external_queries: float
    external_hits: float
    cached_by_source: dict[str, float]
    predicted: float
    """Prompt tokens the router predicted cached on this pod (cumulative)."""
    routed: float
    """Prompt tokens routed to this pod (cumulative)."""
    in_flight: int
    running: int
    waiting: int
    healthy: bool


@dataclass(frozen=True, slots=True)
class Sample:
    """The whole gateway at one instant."""

    at: float
    """Wall-clock seconds since the epoch."""
    pods: dict[str, PodSample]
    queue_length: int


def gateway_counters(gateway: Gateway) -> dict[str, dict[str, float]]:
    """Per-pod values of the gateway counters in `_PER_POD`: field -> pod -> value.

    Reads those two counters through prometheus_client's public `collect`,
    not the whole registry: that holds a series per user and the request
    histograms, and collecting it every second took the event loop about
    20 ms each time on a loaded machine, in front of every request.
    """
    out: dict[str, dict[str, float]] = {}
    for field, name in _PER_POD.items():
        values = out[field] = {}
        for family in getattr(gateway.metrics, name).collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    values[sample.labels["pod"]] = sample.value
    return out


def take_sample(gateway: Gateway) -> Sample:
    """The gateway's figures now."""
    counters = gateway_counters(gateway)
    pods = {}
    for pod in gateway.pods:
        s = pod.stats
        pods[pod.id] = PodSample(
            prefix_queries=s.prefix_queries,
            prefix_hits=s.prefix_hits,
            external_queries=s.external_queries,
            external_hits=s.external_hits,
            cached_by_source=dict(s.cached_by_source),
            predicted=counters["predicted"].get(pod.id, 0.0),
            routed=counters["routed"].get(pod.id, 0.0),
            in_flight=pod.in_flight,
            running=s.running,
            waiting=s.waiting,
            healthy=pod.healthy,
        )
    return Sample(time.time(), pods, len(gateway.router.queue))


class Sampler:
    """Keeps the last `window_s` of samples.

    Args:
        gateway: what to sample.
        interval_s: seconds between samples.
        window_s: seconds of history kept.
    """

    def __init__(self, gateway: Gateway, interval_s: float = 1.0, window_s: float = 300.0) -> None:
        self.gateway = gateway
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(maxlen=max(2, int(window_s / interval_s)))

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            self.samples.append(take_sample(self.gateway))
            await asyncio.sleep(self.interval_s)
