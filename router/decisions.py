"""Routing decisions as the router made them, kept for the live dashboard.

`Router.try_acquire` appends one record per request it places to a bounded
deque (`Router.decisions`); `decision(record)` turns a record into a
`Decision`: which pods were candidates, what each cost under the policy, how
many prompt blocks the prefix index matched on each, and which won.
`router.dashboard` reads them; nothing on the request path does.

NOTE: a record is a plain tuple of references made on every request (about
a microsecond with four pods: building `Decision` values there would cost
several); the values are built only when the dashboard asks.

Not here: the choice itself (`router.routing`), or metrics (`router.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.pods import Pod
from router.policies.base import RouteRequest

#: Decisions kept (the most recent ones).
DECISIONS_KEPT = 64

#: What the router appends: (wall-clock time, request, policy name, chosen pod
#: id, candidate pods, their costs, their in-flight counts before the decision).
DecisionRecord = tuple[float, RouteRequest, str, str, Sequence[Pod], Sequence[float], Sequence[int]]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One pod priced for a request."""

    pod: str
    cost: float
    """The policy's cost (lower wins; ties go to fewer in flight, then chance)."""
    matched_blocks: int
    """Prompt blocks the prefix index believed cached on this pod."""
    in_flight: int
    """Requests the gateway had in flight on this pod before the decision."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One request placed on a pod."""

    at: float
    """Wall-clock time of the decision (seconds since the epoch)."""
    user: str
    model: str
    policy: str
    pod: str
    prompt_tokens: int
    matched_tokens: int
    """Prompt tokens the index believed cached on the chosen pod."""
    candidates: tuple[Candidate, ...]
    """Every candidate, cheapest first."""


def decision(record: DecisionRecord) -> Decision:
    """The `Decision` a router's record describes."""
    at, request, policy, chosen, pods, costs, in_flight = record
    matched = request.matched_blocks
    candidates = sorted(
        (Candidate(p.id, c, matched.get(p.id, 0), n) for p, c, n in zip(pods, costs, in_flight)), key=lambda c: c.cost
    )
    return Decision(
        at=at,
        user=request.user,
        model=request.model,
        policy=policy,
        pod=chosen,
        prompt_tokens=request.prompt_tokens,
        matched_tokens=min(matched.get(chosen, 0) * request.block_size, request.prompt_tokens),
        candidates=tuple(candidates),
    )
