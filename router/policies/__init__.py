"""Routing policies, one per module, chosen by name; weighted mixes combine them.

`build("kv-aware", deps)` gives one policy; `build("prefix-cache:2,least-request:1", deps)`
gives a `WeightedMix` whose cost is the weighted sum of each part's costs,
each min-max normalised to [0, 1] first so no part dominates by its units.

A mix shortlists (`router.fleet_order`) only when every part does: it prices
the union of the parts' shortlists. NOTE: that is approximate, since the
normalisation then spans the shortlist, not the fleet; a mix with a part that
needs every pod prices every pod, as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from router.errors import InvalidRequest
from router.fleet_order import FleetOrder
from router.policies.base import Policy, PolicyDeps, RouteRequest
from router.policies.kv_aware import KVAwarePolicy
from router.policies.least_kv_cache import LeastKVCachePolicy
from router.policies.least_request import LeastRequestPolicy
from router.policies.prefix_cache import PrefixCachePolicy
from router.policies.random import RandomPolicy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.session_affinity import SessionAffinityPolicy
from router.policies.vtc_basic import VTCBasicPolicy
from router.pods import Pod

REGISTRY: dict[str, type] = {
    cls.name: cls
    for cls in (
        RandomPolicy,
        RoundRobinPolicy,
        LeastRequestPolicy,
        LeastKVCachePolicy,
        SessionAffinityPolicy,
        PrefixCachePolicy,
        VTCBasicPolicy,
        KVAwarePolicy,
    )
}


def normalise(costs: Sequence[float]) -> list[float]:
    """Min-max normalise to [0, 1]; all-equal costs become all zero."""
    if not costs:
        return []
    low, high = min(costs), max(costs)
    if high <= low:
        return [0.0] * len(costs)
    span = high - low
    return [(c - low) / span for c in costs]


class WeightedMix:
    """Several policies at once: sum of weight x normalised cost."""

    name = "mix"

    def __init__(self, parts: Sequence[tuple[float, Policy]]) -> None:
        self.parts = tuple(parts)
        if all(hasattr(policy, "shortlist") for _, policy in self.parts):
            self.shortlist = self._shortlist

    def _shortlist(self, request: RouteRequest, fleet: FleetOrder, eligible: Callable[[Pod], bool]) -> list[Pod]:
        union: dict[Pod, None] = {}
        for _, policy in self.parts:
            union.update(dict.fromkeys(policy.shortlist(request, fleet, eligible)))
        return list(union)

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        total = [0.0] * len(pods)
        for weight, policy in self.parts:
            for i, cost in enumerate(normalise(policy.costs(request, pods))):
                total[i] += weight * cost
        return total


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """Parse `name` or `name:weight,name:weight` into (name, weight) pairs.

    Raises:
        InvalidRequest: an unknown name, a bad weight, or an empty spec.
    """
    parts: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, weight_text = item.partition(":")
        name = name.strip()
        if name not in REGISTRY:
            raise InvalidRequest(
                f"unknown routing strategy {name!r}; known: {', '.join(sorted(REGISTRY))}",
                param="x-routing-strategy",
            )
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError as exc:
            raise InvalidRequest(f"bad weight {weight_text!r} for {name}", param="x-routing-strategy") from exc
        if not (weight > 0 and math.isfinite(weight)):  # inf x a normalised 0 would make the mix cost NaN
            raise InvalidRequest(f"weight for {name} must be positive and finite", param="x-routing-strategy")
        parts.append((name, weight))
    if not parts:
        raise InvalidRequest("empty routing strategy", param="x-routing-strategy")
    return parts


class PolicyBook:
    """Policies by spec, built once and reused (policies keep state, e.g. round-robin's turn)."""

    names = frozenset(REGISTRY)

    def __init__(self, deps: PolicyDeps) -> None:
        self._deps = deps
        self._single: dict[str, Policy] = {}
        self._mixes: dict[str, Policy] = {}

    def get(self, spec: str) -> Policy:
        """The policy for `spec` (a name or a weighted mix).

        Raises:
            InvalidRequest: the spec names an unknown policy or is malformed.
        """
        policy = self._mixes.get(spec)
        if policy is not None:
            return policy
        parts = parse_spec(spec)
        if len(parts) == 1:
            policy = self._policy(parts[0][0])
        else:
            policy = WeightedMix([(weight, self._policy(name)) for name, weight in parts])
        if len(self._mixes) < 256:  # specs come from headers: bound what we keep
            self._mixes[spec] = policy
        return policy

    def _policy(self, name: str) -> Policy:
        policy = self._single.get(name)
        if policy is None:
            policy = self._single[name] = REGISTRY[name](self._deps)
        return policy


__all__ = ["REGISTRY", "Policy", "PolicyBook", "PolicyDeps", "RouteRequest", "WeightedMix", "normalise", "parse_spec"]
