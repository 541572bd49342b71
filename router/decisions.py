"""Routing decisions as the router made them, kept for the live dashboard and, if asked, written to a file.

`Router.try_acquire` appends one record per request it places to a bounded
deque (`Router.decisions`); `decision(record)` turns a record into a
`Decision`: which pods were candidates, what each cost under the policy, how
many prompt blocks the prefix index matched on each, and which won.
`router.dashboard` reads them; nothing on the request path does.

`DecisionLog` (`routing.decision_log`, `kvgate serve --decision-log FILE`)
writes every decision as one JSON line, including those where the cheapest
pod was at its adaptive limit and the request waited for it: the record an
operator needs to tell why a prompt missed its cached prefix (sent
elsewhere, or its prefix evicted everywhere) across a whole run, where the
dashboard keeps only the last few.

NOTE: a record is a plain tuple of references made on every request (about
a microsecond with four pods: building `Decision` values there would cost
several); the values are built only when the dashboard asks, or when the
log is on (tens of microseconds a request, and a buffered write).

Not here: the choice itself (`router.routing`), or metrics (`router.metrics`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

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


class DecisionLog:
    """Appends each routing decision to a file as one JSON line: `Decision`'s fields, and `waits`.

    `waits` is true when the cheapest pod was at its adaptive limit and the
    request waited in the queue for a slot there instead of being sent (it is
    logged again when it is placed). Lines are buffered and written at least
    every `flush_s` seconds (checked as decisions come) and on `close`.

    Args:
        path: the file; appended to, created if missing.
        flush_s: longest a decision stays in the buffer while others follow.

    Raises:
        OSError: the file cannot be opened.
    """

    def __init__(self, path: Path, *, flush_s: float = 1.0) -> None:
        self._file = path.open("a", encoding="utf-8", buffering=_BUFFER_BYTES)
        self._flush_s = flush_s
        self._flushed = time.monotonic()
        self.written = 0
        """Decisions written so far."""

    def write(self, record: DecisionRecord, *, waits: bool = False) -> None:
        """Write one decision (side effect: may flush the file)."""
        line = asdict(decision(record))
        line["waits"] = waits
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.written += 1
        now = time.monotonic()
        if now - self._flushed >= self._flush_s:
            self._file.flush()
            self._flushed = now

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()


@dataclass(frozen=True, slots=True)
class LogSummary:
    """What a decision log says about where prompts went against where their prefixes were."""

    placed: int
    """Requests placed (a request that waited is placed later, and counted then)."""
    waits: int
    """Times the cheapest pod was at its limit and the request waited for it."""
    at_longest: int
    """Placed on a pod with the longest cached match of any candidate (and a match there)."""
    sent_away: int
    """Placed on a pod with fewer matched blocks than another candidate had: cost outweighed the match."""
    blocks_given_up: int
    """Matched blocks the sent-away requests left behind on the candidate that had most."""
    nothing_cached: int
    """Placed where no candidate held any block of the prompt (new, or evicted everywhere)."""
    pods_per_user: float
    """Mean number of pods each user's requests went to."""


def summarize_log(lines: Iterable[str]) -> LogSummary:
    """Summarise a decision log's lines (`DecisionLog`'s format; blank lines are skipped).

    Raises:
        ValueError: a line that is not one of the log's records.
    """
    placed = waits = at_longest = sent_away = given_up = nothing = 0
    pods: dict[str, set[str]] = {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            if line["waits"]:
                waits += 1
                continue
            matched = {c["pod"]: int(c["matched_blocks"]) for c in line["candidates"]}
            chosen, user = line["pod"], line["user"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number} is not a decision: {exc}") from None
        placed += 1
        pods.setdefault(user, set()).add(chosen)
        most = max(matched.values(), default=0)
        if most == 0:
            nothing += 1
        elif matched.get(chosen, 0) < most:
            sent_away += 1
            given_up += most - matched.get(chosen, 0)
        else:
            at_longest += 1
    return LogSummary(
        placed=placed,
        waits=waits,
        at_longest=at_longest,
        sent_away=sent_away,
        blocks_given_up=given_up,
        nothing_cached=nothing,
        pods_per_user=sum(len(p) for p in pods.values()) / len(pods) if pods else 0.0,
    )


#: Buffer of the decision log: a write call about every hundred decisions.
_BUFFER_BYTES = 64 * 1024
