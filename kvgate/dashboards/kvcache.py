"""The KV cache dashboard: the shared cache's tiers, nodes, ring and faults.

One function per row. Two kinds of process export ``kvgate_kvcache_*``: the
cache nodes (L2; tier label ``node``; filtered by the ``cache_node``
variable) and the connector inside each vLLM engine (tiers ``l1``, ``l2``,
``l3``, re-exported on the engine's ``/metrics`` with ``engine`` and
``process`` labels). Panels that mean one of them say so.
"""

from __future__ import annotations

from typing import Any

from kvgate.dashboards.panels import CACHE_NODE, RATE, Query, Row, dashboard, timeseries


def traffic_row() -> Row:
    return Row(
        "Tier traffic",
        [
            timeseries(
                "Hits per tier and misses",
                Query(f"sum by (tier) (rate(kvgate_kvcache_hits_total[{RATE}]))", "hit {{tier}}"),
                Query(f"sum(rate(kvgate_kvcache_misses_total[{RATE}]))", "miss"),
                unit="short",
                stack=True,
                description="Blocks per second served by each tier of the connectors' stores, and found in none.",
            ),
            timeseries(
                "Bytes per tier",
                Query(f"sum by (tier, op) (rate(kvgate_kvcache_bytes_total[{RATE}]))", "{{tier}} {{op}}"),
                unit="Bps",
                description="Frame bytes read (get) and written (put) per tier.",
            ),
            timeseries(
                "Tier call latency (p99)",
                Query(
                    f"histogram_quantile(0.99, sum by (tier, op, le) (rate(kvgate_kvcache_op_seconds_bucket[{RATE}])))",
                    "{{tier}} {{op}}",
                ),
                unit="s",
                description="99th percentile of one batched call to a tier.",
            ),
            timeseries(
                "Cache node blocks",
                Query(
                    f"sum by (instance, method, outcome) (rate(kvgate_kvcache_node_blocks_total{{{CACHE_NODE}}}[{RATE}]))",
                    "{{instance}} {{method}} {{outcome}}",
                ),
                unit="short",
                description="Blocks each cache node served (Get hit/miss) or stored (Put stored/rejected), per second.",
            ),
            timeseries(
                "Cache node requests",
                Query(
                    f"sum by (instance, method) (rate(kvgate_kvcache_node_requests_total{{{CACHE_NODE}}}[{RATE}]))",
                    "{{instance}} {{method}}",
                ),
                unit="reqps",
                description="RPCs per second each cache node answered.",
            ),
        ],
    )


def occupancy_row() -> Row:
    return Row(
        "Occupancy",
        [
            timeseries(
                "Bytes held (L1 and cache nodes)",
                Query("sum by (instance, tier) (kvgate_kvcache_stored_bytes)", "{{instance}} {{tier}}"),
                unit="bytes",
                description="Frame bytes held in memory: each connector's L1 and each cache node's store.",
            ),
            timeseries(
                "Evictions",
                Query(f"sum by (instance, tier) (rate(kvgate_kvcache_evictions_total[{RATE}]))", "{{instance}} {{tier}}"),
                unit="short",
                description="Blocks evicted per second to stay within a byte budget.",
            ),
        ],
    )


def ring_row() -> Row:
    return Row(
        "Ring",
        [
            timeseries(
                "Ring members",
                Query(f"max by (instance) (kvgate_kvcache_node_ring_members{{{CACHE_NODE}}})", "{{instance}}"),
                description="Nodes in each cache node's view of the ring.",
            ),
            timeseries(
                "Hand-offs",
                Query(
                    f"sum by (instance, outcome) (increase(kvgate_kvcache_node_handoff_blocks_total{{{CACHE_NODE}}}[{RATE}]))",
                    "{{instance}} {{outcome}}",
                ),
                unit="short",
                description="Blocks a leaving node handed to their new owners (sent) or could not (failed).",
            ),
        ],
    )


def write_behind_row() -> Row:
    return Row(
        "Write-behind",
        [
            timeseries(
                "Write-behind queue",
                Query("sum by (instance, tier) (kvgate_kvcache_pending_write_bytes)", "{{instance}} {{tier}}"),
                unit="bytes",
                description="Frame bytes waiting to be written to L2 and L3 behind the engine.",
            ),
            timeseries(
                "Dropped writes",
                Query(f"sum by (tier, reason) (rate(kvgate_kvcache_dropped_writes_total[{RATE}]))", "{{tier}} {{reason}}"),
                unit="short",
                description="Blocks not written: queue full, tier down, or write failed.",
            ),
        ],
    )


def faults_row() -> Row:
    return Row(
        "Faults",
        [
            timeseries(
                "Checksum failures",
                Query(
                    f"sum by (tier, reason) (increase(kvgate_kvcache_checksum_failures_total[{RATE}]))",
                    "{{tier}} {{reason}}",
                ),
                unit="short",
                description="Frames that failed their check and were treated as misses.",
            ),
            timeseries(
                "Tier skips",
                Query(f"sum by (tier, op) (rate(kvgate_kvcache_tier_skipped_total[{RATE}]))", "{{tier}} {{op}}"),
                unit="short",
                description="Calls not made because the tier was marked down.",
            ),
            timeseries(
                "Tiers up",
                Query("min by (tier) (kvgate_kvcache_tier_up)", "{{tier}}"),
                unit="bool",
                description="1 while every store uses the tier; 0 while one skips it after failures.",
            ),
        ],
    )


def build() -> dict[str, Any]:
    """The KV cache dashboard's JSON."""
    return dashboard(
        "kvgate / KV cache",
        "kvgate-kvcache",
        "The shared KV cache: hits, bytes and latency per tier, occupancy, ring, write-behind and faults.",
        [traffic_row(), occupancy_row(), ring_row(), write_behind_row(), faults_row()],
    )
