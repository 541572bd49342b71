"""`prefix-cache`: the pod holding the longest cached prefix, with an imbalance guard.

As AIBrix and SGLang do: if the busiest and idlest pods differ by more than
`imbalance_abs` requests, route by load alone. Otherwise prefer the longest
match among pods whose load is at most mean + one standard deviation, ties to
the less loaded; with no match anywhere, the least loaded pod.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from router.policies.base import PolicyDeps, RouteRequest, load
from router.pods import Pod

_OVERLOADED = 1e9


class PrefixCachePolicy:
    name = "prefix-cache"

    def __init__(self, deps: PolicyDeps) -> None:
        self._imbalance_abs = deps.settings.imbalance_abs

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        loads = [float(load(pod)) for pod in pods]
        if not pods:
            return []
        matched = [request.matched_blocks.get(pod.id, 0) for pod in pods]
        if max(loads) - min(loads) > self._imbalance_abs or max(matched) == 0:
            return loads
        ceiling = statistics.fmean(loads) + statistics.pstdev(loads)
        # Matched blocks dominate; load (< 1e6) only breaks ties between equal matches.
        return [
            (_OVERLOADED if loads[i] > ceiling else 0.0) - matched[i] * 1e6 + loads[i]
            for i in range(len(pods))
        ]
