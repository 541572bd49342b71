"""The live page's JSON: rates over the sampled history plus the gateway's state now.

`snapshot(gateway, samples)` is what ``GET /dashboard/data`` returns:

- ``series``: time series over the sampled window, as rates between samples
  `RATE_SPAN` apart: prompt tokens per second taken from a cache and
  computed, the fleet's and each pod's engine-confirmed hit rate, the
  router's predicted hit rate, and cached tokens per second by tier;
- ``pods``: each pod now (health, in flight and its concurrency limit,
  engine running/waiting, KV usage, its cumulative counters as ``/metrics``
  shows them);
- ``queue``, ``users`` (VTC counter, service received and share) and
  ``decisions`` (the most recent, each with every candidate's cost).

Not here: sampling (`.samples`), or HTTP (`router.dashboard`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from router.dashboard.samples import Sample, gateway_counters
from router.decisions import decision
from router.gateway import Gateway

#: Rates are taken between samples this many intervals apart (smooths jitter).
RATE_SPAN = 3
#: Names of vLLM's cache-hit sources as the page shows them.
TIERS = {"device": "GPU", "host": "L1", "p2p": "L2", "disk": "L3", "external_unspecified": "external"}
#: Decisions sent to the page.
DECISIONS_SHOWN = 20


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _series(samples: Sequence[Sample]) -> dict[str, Any]:
    t: list[float] = []
    saved: list[float] = []
    computed: list[float] = []
    fleet: list[float | None] = []
    predicted: list[float | None] = []
    by_pod: dict[str, list[float | None]] = {}
    by_tier: dict[str, list[float]] = {name: [] for name in TIERS.values()}
    for i in range(1, len(samples)):
        b = samples[i]
        window = samples[max(0, i - RATE_SPAN) : i]
        # Per-second rates summed over pods; each pod from its oldest sample in the window.
        hits = queries = pred = routed = cached = 0.0
        tiers = dict.fromkeys(by_tier, 0.0)
        rates: dict[str, float | None] = {}
        for pod, now in b.pods.items():
            a = next((s for s in window if pod in s.pods), None)
            dt = b.at - a.at if a is not None else 0.0
            if a is None or dt <= 0:
                rates[pod] = None
                continue
            then = a.pods[pod]
            dq, dh = (now.prefix_queries - then.prefix_queries) / dt, (now.prefix_hits - then.prefix_hits) / dt
            hits, queries = hits + dh, queries + dq
            cached += dh + (now.external_hits - then.external_hits) / dt
            pred += (now.predicted - then.predicted) / dt
            routed += (now.routed - then.routed) / dt
            rates[pod] = _ratio(dh, dq)
            for source, name in TIERS.items():
                tiers[name] += (now.cached_by_source.get(source, 0.0) - then.cached_by_source.get(source, 0.0)) / dt
        for pod, rate in rates.items():
            by_pod.setdefault(pod, [None] * len(t)).append(rate)
        for values in by_pod.values():  # pods not there now get a gap
            values.extend([None] * (len(t) + 1 - len(values)))
        t.append(b.at)
        saved.append(max(cached, 0.0))
        computed.append(max(queries - cached, 0.0))
        fleet.append(_ratio(hits, queries))
        predicted.append(_ratio(pred, routed))
        for name, value in tiers.items():
            by_tier[name].append(max(value, 0.0))
    return {
        "t": t,
        "saved_tokens_per_s": saved,
        "computed_tokens_per_s": computed,
        "fleet_hit_rate": fleet,
        "predicted_hit_rate": predicted,
        "hit_rate_by_pod": by_pod,
        "cached_tokens_per_s_by_tier": by_tier,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _decision(record: Any) -> dict[str, Any]:
    d = decision(record)
    return {
        "at": d.at,
        "user": d.user,
        "model": d.model,
        "policy": d.policy,
        "pod": d.pod,
        "prompt_tokens": d.prompt_tokens,
        "matched_tokens": d.matched_tokens,
        "candidates": [
            {"pod": c.pod, "cost": _finite(c.cost), "matched_blocks": c.matched_blocks, "in_flight": c.in_flight, "won": c.pod == d.pod}
            for c in d.candidates
        ],
    }


def snapshot(gateway: Gateway, samples: Sequence[Sample], interval_s: float) -> dict[str, Any]:
    """The page's data now (see the module docstring for its parts)."""
    counters = gateway_counters(gateway)
    pods = []
    for pod in sorted(gateway.pods, key=lambda p: p.id):
        s = pod.stats
        pods.append(
            {
                "id": pod.id,
                "healthy": pod.healthy,
                "in_flight": pod.in_flight,
                "limit": gateway.router.limits.limit(pod),
                "pending_prefill": pod.pending_prefill,
                "running": s.running,
                "waiting": s.waiting,
                "kv_usage": s.kv_usage,
                "prefix_queries": s.prefix_queries,
                "prefix_hits": s.prefix_hits,
                "external_queries": s.external_queries,
                "external_hits": s.external_hits,
                "hit_rate": _ratio(s.prefix_hits, s.prefix_queries),
                "predicted_tokens": counters["predicted"].get(pod.id, 0.0),
                "routed_tokens": counters["routed"].get(pod.id, 0.0),
            }
        )
    served = gateway.counters.served()
    total = sum(served.values())
    virtual = gateway.counters.snapshot()
    users = [
        {"user": user, "virtual_tokens": virtual.get(user, 0.0), "served_tokens": value, "share": _ratio(value, total)}
        for user, value in sorted(served.items(), key=lambda kv: -kv[1])
    ]
    decisions = list(gateway.router.decisions)[-DECISIONS_SHOWN:]
    return {
        "interval_s": interval_s,
        "samples": len(samples),
        "updated_at": samples[-1].at if samples else None,
        "series": _series(list(samples)),
        "pods": pods,
        "queue": {"length": len(gateway.router.queue), "limit": gateway.settings.admission.max_queue},
        "users": users,
        "decisions": [_decision(d) for d in reversed(decisions)],
    }
