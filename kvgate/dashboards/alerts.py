"""Prometheus alert rules for a kvgate fleet.

`rules()` returns the rule file as a dict (written as YAML by
`kvgate.dashboards.__main__`, checked by ``promtool check rules`` in the
tests). Each rule names the figure it watches; thresholds are starting
points to tune per deployment.
"""

from __future__ import annotations

from typing import Any


def _ratio(hits: str, queries: str, window: str, offset: str = "") -> str:
    at = f" offset {offset}" if offset else ""
    return f"(sum(rate({hits}[{window}]{at})) / sum(rate({queries}[{window}]{at})))"


def _rule(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": description},
    }


def rules() -> dict[str, Any]:
    """The alert rule groups."""
    hits, queries = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
    predicted = _ratio("kvgate_predicted_prefix_hit_tokens_total", "kvgate_prompt_tokens_total", "15m")
    confirmed = _ratio("kvgate_engine_prefix_cache_hits_total", "kvgate_engine_prefix_cache_queries_total", "15m")
    return {
        "groups": [
            {
                "name": "kvgate-cache",
                "rules": [
                    _rule(
                        "KvgatePrefixHitRateFalling",
                        f"{_ratio(hits, queries, '15m')} < 0.7 * {_ratio(hits, queries, '1h', '1h')}",
                        "15m",
                        "warning",
                        "Fleet prefix-cache hit rate fell by over 30%",
                        "The engines' hit rate over 15 minutes is below 70% of what it was an hour earlier: "
                        "traffic changed, KV capacity shrank, or routing stopped following the cache.",
                    ),
                    _rule(
                        "KvgateRouterAccuracyDrift",
                        f"abs({predicted} - {confirmed}) > 0.2",
                        "15m",
                        "warning",
                        "The router's predicted hit rate is 20 points off the engines'",
                        "The prefix index believes in blocks the engines no longer hold (or misses ones they do): "
                        "check KV event delivery and the engines' KV capacity.",
                    ),
                    _rule(
                        "KvgateChecksumFailures",
                        "sum by (instance, tier) (increase(kvgate_kvcache_checksum_failures_total[10m])) > 0",
                        "0m",
                        "warning",
                        "KV frames failed their checks in tier {{ $labels.tier }}",
                        "Corrupt or foreign frames were read and treated as misses on {{ $labels.instance }}.",
                    ),
                    _rule(
                        "KvgateL3Unreachable",
                        'min by (instance) (kvgate_kvcache_tier_up{tier="l3"}) == 0',
                        "2m",
                        "critical",
                        "L3 is unreachable from {{ $labels.instance }}",
                        "The connector skips its persistent tier after failures: blocks are not persisted and "
                        "cold engines cannot load them.",
                    ),
                ],
            },
            {
                "name": "kvgate-serving",
                "rules": [
                    _rule(
                        "KvgatePodDown",
                        "kvgate_pod_healthy == 0",
                        "2m",
                        "critical",
                        "Pod {{ $labels.pod }} is out of rotation",
                        "The gateway's health probes of the pod fail; its traffic goes to the others.",
                    ),
                    _rule(
                        "KvgateEngineScrapeDown",
                        'up{job=~"vllm.*|kvgate.*"} == 0',
                        "2m",
                        "critical",
                        "{{ $labels.job }} target {{ $labels.instance }} is down",
                        "Prometheus cannot scrape the process.",
                    ),
                    _rule(
                        "KvgateAdmissionQueueSaturated",
                        "max(kvgate_admission_queue_length / kvgate_admission_queue_limit) > 0.8",
                        "5m",
                        "warning",
                        "The admission queue is over 80% full",
                        "Every pod is at its concurrency limit and requests are queueing; soon they get 429. "
                        "Add engines or raise max_inflight_per_pod.",
                    ),
                ],
            },
        ]
    }
