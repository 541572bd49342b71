"""Routing decisions as the router made them, kept for the live dashboard.

`Router.try_acquire` appends one `Decision` per request it places to a bounded
deque (`Router.decisions`): which pods were candidates, what each cost under
the policy, how many prompt blocks the prefix index matched on each, and which
won. `router.dashboard` reads the deque; nothing on the request path does.

Not here: the choice itself (`router.routing`), or metrics (`router.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Decisions kept (the most recent ones); about 1 KB each with a few pods.
DECISIONS_KEPT = 64


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
    block_size: int
    candidates: tuple[Candidate, ...]
