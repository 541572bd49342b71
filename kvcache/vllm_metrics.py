"""The connector's metrics, carried from vLLM's engine processes to its ``/metrics``.

The connector runs inside vLLM's scheduler and worker processes; users scrape
the API server. vLLM's own path between them is `KVConnectorStats`: each
process hands a payload to the engine loop, which ships it to the API server,
where the connector class's `KVConnectorPromMetrics` observes it.

What travels: a snapshot of the process's own `StoreMetrics` registry (every
sample of every family, cumulative), after each engine step in which the
connector was active, keyed by the process role. The API server keeps the latest snapshot per engine and
process and serves it as is, with ``engine`` and ``process`` labels added.
Cumulative snapshots make lost or merged payloads harmless: the newest wins.

NOTE: vLLM hands `build_prom_metrics` metric classes, not a registry, so the
collector registers itself in prometheus_client's default registry, which is
the one vLLM's API server exposes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import Metric
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

#: Payload key: {process: [family, ...]} where family = [name, type, help, [[sample, labels, value], ...]].
SNAPSHOTS = "kvgate_kvcache_snapshots"


def snapshot(registry: CollectorRegistry) -> list[list[Any]]:
    """Every family and sample of `registry`, as plain lists (msgpack/pickle safe)."""
    families = []
    for family in registry.collect():
        samples = [[s.name, dict(s.labels), float(s.value)] for s in family.samples]
        families.append([family.name, family.type, family.documentation, samples])
    return families


class StatsSnapshotter:
    """Produces a process's stats payload after connector activity.

    NOTE: vLLM asks for stats once per engine step and never between steps.
    Sending only after steps in which the connector did something (a lookup,
    a load, a save) keeps the cost (a registry walk, well under a
    millisecond) off the many decode steps that touch no cache, while every
    change reaches ``/metrics`` with the step that caused it. Write-behind
    completions after the last active step wait for the next one.

    Args:
        registry: the process's store metrics.
        process: label value naming the process (``scheduler``, ``worker0``).
    """

    def __init__(self, registry: CollectorRegistry, process: str) -> None:
        self._registry = registry
        self._process = process
        self._last: list[list[Any]] | None = None
        self._active = True  # the first call reports the initial state

    def mark_active(self) -> None:
        """Note that metrics may have changed (safe from any thread)."""
        self._active = True

    def take(self) -> TieredConnectorStats | None:
        """A payload if there was activity and the metrics changed, else None."""
        if not self._active:
            return None
        self._active = False
        current = snapshot(self._registry)
        if current == self._last:
            return None
        self._last = current
        return TieredConnectorStats(data={SNAPSHOTS: {self._process: current}})


class TieredConnectorStats(KVConnectorStats):
    """Cumulative metric snapshots of the connector's processes."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = dict(self.data.get(SNAPSHOTS, {}))
        merged.update(other.data.get(SNAPSHOTS, {}))
        return TieredConnectorStats(data={SNAPSHOTS: merged})

    def reduce(self) -> dict[str, int | float]:
        """Hits per tier and misses, summed over processes (for vLLM's log line)."""
        totals: dict[str, float] = {}
        for families in self.data.get(SNAPSHOTS, {}).values():
            for name, _type, _help, samples in families:
                if name not in ("kvgate_kvcache_hits", "kvgate_kvcache_misses"):
                    continue
                for sample, labels, value in samples:
                    if sample.endswith("_total"):
                        label = f"{name.rsplit('_', 1)[1]}_{labels.get('tier', 'all')}"
                        totals[label] = totals.get(label, 0.0) + value
        return totals

    def is_empty(self) -> bool:
        return not self.data.get(SNAPSHOTS)


class _SnapshotCollector:
    """Serves the latest snapshots received, with engine and process labels."""

    def __init__(self, engine_labels: dict[int, dict[str, str]]) -> None:
        self._engine_labels = engine_labels
        self._latest: dict[tuple[int, str], list[list[Any]]] = {}
        self._lock = threading.Lock()

    def update(self, engine_idx: int, snapshots: dict[str, list[list[Any]]]) -> None:
        with self._lock:
            for process, families in snapshots.items():
                self._latest[(engine_idx, process)] = families

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            latest = dict(self._latest)
        merged: dict[str, Metric] = {}
        for (engine_idx, process), families in sorted(latest.items()):
            extra = {**self._engine_labels.get(engine_idx, {"engine": str(engine_idx)}), "process": process}
            for name, kind, documentation, samples in families:
                metric = merged.get(name)
                if metric is None:
                    metric = merged[name] = Metric(name, documentation, kind)
                for sample, labels, value in samples:
                    metric.add_sample(sample, {**labels, **extra}, value)
        yield from merged.values()

    def describe(self) -> list[Metric]:
        return []


class TieredPromMetrics(KVConnectorPromMetrics):
    """vLLM's hook: observes payloads in the API server and exposes them."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        labels = {
            engine: {name: str(value) for name, value in zip(labelnames, values)}
            for engine, values in per_engine_labelvalues.items()
        }
        self._collector = _SnapshotCollector(labels)
        REGISTRY.register(self._collector)  # type: ignore[arg-type]

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        snapshots = transfer_stats_data.get(SNAPSHOTS)
        if snapshots:
            self._collector.update(engine_idx, snapshots)
