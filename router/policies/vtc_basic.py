"""`vtc-basic`: AIBrix's fairness scorer, kept compatible for users switching over.

Each pod's cost is 0.5 x |pod index - (user tokens mod 100 x pods) / 100| plus
0.5 x min(running / 100, 1) plus a jitter in [0, 0.1). It spreads users over
pods by how much they have consumed; it is not the VTC scheduler (that is the
admission queue, `router.admission`). User tokens are the VTC counters.

"Running" is the pod's load now (`Pod.load`: every gateway replica's requests
on it, plus those others sent the engine), where AIBrix reads the engine's
running count from its last scrape. That count is as old as the scrape: after
a burst it still shows requests that have finished, and it misses those sent
since, so consecutive requests all saw the same "idle" pod until the next
scrape. The formula is AIBrix's; only the count is current.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import PolicyDeps, RouteRequest, load
from router.pods import Pod

FAIRNESS_WEIGHT = 0.5
UTILIZATION_WEIGHT = 0.5
MAX_POD_LOAD = 100.0
JITTER = 0.1


class VTCBasicPolicy:
    name = "vtc-basic"

    def __init__(self, deps: PolicyDeps) -> None:
        self._counters = deps.counters
        self._rng = deps.rng

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        ordered = sorted(pods, key=lambda p: p.id)
        index = {pod.id: i for i, pod in enumerate(ordered)}
        normalized = (self._counters.get(request.user) % (len(pods) * 100)) / 100.0 if pods else 0.0
        costs = []
        for pod in pods:
            fairness = abs(index[pod.id] - normalized)
            utilization = min(load(pod) / MAX_POD_LOAD, 1.0)
            costs.append(FAIRNESS_WEIGHT * fairness + UTILIZATION_WEIGHT * utilization + self._rng.random() * JITTER)
        return costs
