"""Prometheus metrics of the KV block store and the cache node.

Both classes register on a registry their owner passes in (never the global
default registry), so two stores in one process, or a test, never collide.
Label ``tier`` is the tier name (``l1``, ``l2``, ``l3``); ``op`` is one of
``get``, ``put``, ``exists``.

Not here: the connector's export of these figures through vLLM's own
``/metrics`` (see `kvcache.vllm_connector`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "kvgate_kvcache"
#: Values of the ``op`` label.
OPS = ("get", "put", "exists")
#: Values of ``reason`` on checksum failures (`kvcache.framing.corruption_reason`).
CHECK_REASONS = ("length", "magic", "key", "checksum")
#: Values of ``reason`` on dropped writes.
DROP_REASONS = ("queue_full", "tier_down", "write_failed")

#: Latency buckets in seconds, from an L1 hit to a slow remote batch.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class StoreMetrics:
    """Counters, gauges and histograms of one tiered store.

    Args:
        registry: where to register; each `StoreMetrics` needs its own.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.hits = Counter(
            f"{PREFIX}_hits_total", "Blocks found, by the tier that served them.", ["tier"], registry=registry
        )
        self.misses = Counter(
            f"{PREFIX}_misses_total", "Blocks looked up and found in no tier.", registry=registry
        )
        self.bytes = Counter(
            f"{PREFIX}_bytes_total", "Frame bytes moved, by tier and operation.", ["tier", "op"], registry=registry
        )
        self.seconds = Histogram(
            f"{PREFIX}_op_seconds",
            "Latency of one batched call to a tier.",
            ["tier", "op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.checksum_failures = Counter(
            f"{PREFIX}_checksum_failures_total",
            "Frames that failed their check (magic, length, key, checksum) and were treated as misses.",
            ["tier", "reason"],
            registry=registry,
        )
        self.dropped_writes = Counter(
            f"{PREFIX}_dropped_writes_total",
            "Blocks not written to a tier: queue full, tier down, or write failed.",
            ["tier", "reason"],
            registry=registry,
        )
        self.dropped_bytes = Counter(
            f"{PREFIX}_dropped_bytes_total", "Frame bytes of dropped writes.", ["tier"], registry=registry
        )
        self.skipped = Counter(
            f"{PREFIX}_tier_skipped_total",
            "Calls not made because the tier was marked down.",
            ["tier", "op"],
            registry=registry,
        )
        self.failures = Counter(
            f"{PREFIX}_tier_failures_total",
            "Calls to a tier that failed and marked it down.",
            ["tier", "op", "error"],
            registry=registry,
        )
        self.rejections = Counter(
            f"{PREFIX}_tier_rejections_total",
            "Calls a tier (or an L2 node) refused for good; the tier stays in use.",
            ["tier", "op"],
            registry=registry,
        )
        self.tier_up = Gauge(
            f"{PREFIX}_tier_up", "1 while the tier is in use, 0 while it is skipped.", ["tier"], registry=registry
        )
        self.evictions = Counter(
            f"{PREFIX}_evictions_total", "Blocks evicted to stay within a byte budget.", ["tier"], registry=registry
        )
        self.stored_bytes = Gauge(
            f"{PREFIX}_stored_bytes", "Frame bytes held in process memory.", ["tier"], registry=registry
        )
        self.pending_write_bytes = Gauge(
            f"{PREFIX}_pending_write_bytes",
            "Frame bytes queued for a write-behind tier.",
            ["tier"],
            registry=registry,
        )

    def prime(self, tier: str) -> None:
        """Create `tier`'s series at zero, so dashboards and alerts see them before the first event.

        Args:
            tier: the tier's name (its ``tier`` label).
        """
        for child in (self.hits, self.evictions, self.dropped_bytes, self.pending_write_bytes):
            child.labels(tier)
        for op in OPS:
            for child in (self.skipped, self.seconds):
                child.labels(tier, op)
        for op in ("get", "put"):
            self.bytes.labels(tier, op)
        for reason in CHECK_REASONS:
            self.checksum_failures.labels(tier, reason)
        for reason in DROP_REASONS:
            self.dropped_writes.labels(tier, reason)


class NodeMetrics:
    """Metrics of one L2 cache node.

    Args:
        registry: where to register.
        store: the node's block store metrics share this registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.store = StoreMetrics(registry)
        self.requests = Counter(
            f"{PREFIX}_node_requests_total", "RPCs served, by method.", ["method"], registry=registry
        )
        self.blocks = Counter(
            f"{PREFIX}_node_blocks_total", "Blocks served or stored, by method and outcome.",
            ["method", "outcome"], registry=registry,
        )
        self.handoff_blocks = Counter(
            f"{PREFIX}_node_handoff_blocks_total",
            "Blocks handed to their new owner on a graceful leave, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.members = Gauge(
            f"{PREFIX}_node_ring_members", "Nodes in this node's view of the ring.", registry=registry
        )
        self.rejected = Counter(
            f"{PREFIX}_node_rejected_requests_total",
            "Calls refused: no valid token, or a request beyond the node's limits, by method and reason.",
            ["method", "reason"],
            registry=registry,
        )
        self.pending_upload_bytes = Gauge(
            f"{PREFIX}_node_pending_upload_bytes",
            "Bytes reserved for frames still being streamed in (bounded by the upload budget).",
            registry=registry,
        )
        for outcome in ("sent", "failed"):
            self.handoff_blocks.labels(outcome)
