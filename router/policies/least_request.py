"""`least-request`: the pod with the fewest requests in flight (the gateway's count, or the engine's if higher).

Shortlist: the fleet ordered by that load; the first eligible pods of the
least load are exactly the full scan's choice (up to `TIE_CAP` of them tie).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router.fleet_order import TIE_CAP, FleetOrder
from router.policies.base import PolicyDeps, RouteRequest, load
from router.pods import Pod


class LeastRequestPolicy:
    name = "least-request"

    def __init__(self, deps: PolicyDeps) -> None:
        pass

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        return [float(load(pod)) for pod in pods]

    def shortlist(self, request: RouteRequest, fleet: FleetOrder, eligible: Callable[[Pod], bool]) -> list[Pod]:
        """The eligible pods of least load, walking the fleet in load order."""
        fleet.ordering(self.name, _load)
        chosen: list[Pod] = []
        least = None
        for _, key, pod in fleet.walk((self.name,)):
            if least is not None and key > least:
                break
            if eligible(pod):
                least = key
                chosen.append(pod)
                if len(chosen) >= TIE_CAP:
                    break
        return chosen


def _load(pod: Pod) -> float:
    return float(load(pod))
