"""`least-request`: the pod with the fewest requests in flight (the gateway's count, or the engine's if higher)."""

from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import PolicyDeps, RouteRequest, load
from router.pods import Pod


class LeastRequestPolicy:
    name = "least-request"

    def __init__(self, deps: PolicyDeps) -> None:
        pass

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        return [float(load(pod)) for pod in pods]
