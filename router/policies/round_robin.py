"""`round-robin`: pods in turn, ignoring cache and load."""

from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import PolicyDeps, RouteRequest
from router.pods import Pod


class RoundRobinPolicy:
    name = "round-robin"

    def __init__(self, deps: PolicyDeps) -> None:
        self._turn = 0

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        # The pod whose turn it is costs 0, the next one 1, and so on; pods are
        # ordered by id so the rotation survives pods leaving and returning.
        order = sorted(range(len(pods)), key=lambda i: pods[i].id)
        costs = [0.0] * len(pods)
        start = self._turn % len(pods) if pods else 0
        for rank, i in enumerate(order[start:] + order[:start]):
            costs[i] = float(rank)
        self._turn += 1
        return costs
