"""The routing dashboard: how the gateway decides, loads pods and shares them between users.

One function per row; every figure comes from the gateway (``kvgate_*``),
the engine load figures as the gateway re-exports them per pod.
"""

from __future__ import annotations

from typing import Any

from kvgate.dashboards.panels import POD, RATE, Query, Row, dashboard, timeseries


def _quantiles(metric: str) -> list[Query]:
    buckets = f"sum by (le) (rate({metric}_bucket[{RATE}]))"
    return [Query(f"histogram_quantile({q}, {buckets})", f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)]


def decisions_row() -> Row:
    return Row(
        "Decisions",
        [
            timeseries(
                "Routing decision latency",
                *_quantiles("kvgate_routing_decision_seconds"),
                unit="s",
                description="Time to price the candidate pods and pick one.",
            ),
            timeseries(
                "Matched prefix length",
                *_quantiles("kvgate_matched_prefix_tokens"),
                unit="short",
                description="Prompt tokens the prefix index believed cached on the chosen pod.",
            ),
            timeseries(
                "Routed prompt tokens by pod",
                Query(f"sum by (pod) (rate(kvgate_prompt_tokens_total{{{POD}}}[{RATE}]))", "{{pod}}"),
                unit="short",
                stack=True,
                description="Prompt tokens per second sent to each pod: how evenly the policy spreads work.",
            ),
        ],
    )


def load_row() -> Row:
    return Row(
        "Load",
        [
            timeseries(
                "In flight per pod (gateway)",
                Query(f"sum by (pod) (kvgate_pod_in_flight{{{POD}}})", "{{pod}}"),
                Query(f"max by (pod) (kvgate_pod_concurrency_limit{{{POD}}})", "limit {{pod}}"),
                description="Requests the gateway has sent to each pod and not yet seen finish, and each pod's "
                "concurrency limit (adaptive: it follows the engine's waiting queue, KV usage and TTFT).",
            ),
            timeseries(
                "Running and waiting per pod (engines)",
                Query(f"sum by (pod) (kvgate_engine_requests_running{{{POD}}})", "running {{pod}}"),
                Query(f"sum by (pod) (kvgate_engine_requests_waiting{{{POD}}})", "waiting {{pod}}"),
                description="What each engine reports about its own scheduler.",
            ),
            timeseries(
                "KV cache usage per pod",
                Query(f"max by (pod) (kvgate_engine_kv_cache_usage{{{POD}}})", "{{pod}}"),
                unit="percentunit",
                description="Fraction of each engine's KV blocks in use.",
            ),
        ],
    )


def admission_row() -> Row:
    return Row(
        "Admission queue",
        [
            timeseries(
                "Admission queue length",
                Query("sum(kvgate_admission_queue_length)", "waiting"),
                Query("sum(kvgate_admission_queue_limit)", "limit"),
                description="Requests waiting because every pod was at its concurrency limit; past the limit they get 429.",
            ),
            timeseries(
                "Admission wait",
                *_quantiles("kvgate_admission_wait_seconds"),
                unit="s",
                description="Time spent in the queue by the requests that had to wait.",
            ),
        ],
    )


def fairness_row() -> Row:
    served = f"sum by (user) (rate(kvgate_user_service_tokens_total[{RATE}]))"
    return Row(
        "Fairness",
        [
            timeseries(
                "Virtual token counter per user",
                Query("sum by (user) (kvgate_user_virtual_tokens)", "{{user}}"),
                description="VTC counters: the queue serves the smallest first; an idle user is lifted to the smallest active one.",
            ),
            timeseries(
                "Service share per user",
                Query(f"{served} / ignoring (user) group_left sum({served})", "{{user}}"),
                unit="percentunit",
                stack=True,
                description="Each user's share of the weighted tokens served (input plus weighted output).",
            ),
        ],
    )


def build() -> dict[str, Any]:
    """The routing dashboard's JSON."""
    return dashboard(
        "kvgate / Routing",
        "kvgate-routing",
        "Routing decisions, pod load, the admission queue and per-user fairness.",
        [decisions_row(), load_row(), admission_row(), fairness_row()],
    )
