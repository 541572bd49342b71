"""`random`: a uniformly random pod. The baseline every other policy must beat."""

from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import PolicyDeps, RouteRequest
from router.pods import Pod


class RandomPolicy:
    name = "random"

    def __init__(self, deps: PolicyDeps) -> None:
        self._rng = deps.rng

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        return [self._rng.random() for _ in pods]
