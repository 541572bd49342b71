"""`least-kv-cache`: the pod whose KV cache is least used (`vllm:kv_cache_usage_perc`).

The scraped figure lags; requests the gateway sent since the last scrape are
added as blocks they will take, so a burst does not all land on one pod.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import PolicyDeps, RouteRequest
from router.pods import Pod


class LeastKVCachePolicy:
    name = "least-kv-cache"

    def __init__(self, deps: PolicyDeps) -> None:
        self._settings = deps.settings

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        costs = []
        for pod in pods:
            capacity_tokens = (pod.stats.num_gpu_blocks or self._settings.default_capacity_blocks) * request.block_size
            unscraped = pod.fleet_pending_prefill / capacity_tokens if capacity_tokens else 0.0
            costs.append(pod.stats.kv_usage + unscraped)
        return costs
