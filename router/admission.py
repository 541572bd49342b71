"""The admission queue: requests wait here when every pod is at its concurrency limit.

Waiting requests are grouped per user, first-in first-out within a user; the
next one dispatched is the head of the user with the smallest virtual token
counter (`router.fairness`), so a heavy user cannot starve light ones. The
queue is bounded: one request past `max_size` is refused with 429.

This module only orders waiters. `router.routing.Router` decides when a slot
frees and hands the waiter its lease.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from router.errors import OverLimit
from router.fairness import VirtualTokenCounters
from router.pods import UserId


@dataclass(slots=True, eq=False)
class Waiter:
    """One request waiting for a slot; `future` receives its lease."""

    user: UserId
    payload: Any
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AdmissionQueue:
    """Waiters per user, served by smallest counter.

    Args:
        counters: the VTC counters that order users.
        max_size: waiters allowed at once.
    """

    def __init__(self, counters: VirtualTokenCounters, max_size: int) -> None:
        self._counters = counters
        self._max_size = max_size
        self._by_user: dict[UserId, deque[Waiter]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, waiter: Waiter) -> None:
        """Add `waiter` at the back of its user's line.

        Raises:
            OverLimit: the queue is full.
        """
        if self._size >= self._max_size:
            raise OverLimit(f"all pods are busy and {self._size} requests are already waiting; retry later")
        self._by_user.setdefault(waiter.user, deque()).append(waiter)
        self._size += 1

    def remove(self, waiter: Waiter) -> bool:
        """Take `waiter` out (dispatched, timed out or abandoned). Returns whether it was queued."""
        line = self._by_user.get(waiter.user)
        if not line:
            return False
        try:
            line.remove(waiter)
        except ValueError:
            return False
        if not line:
            del self._by_user[waiter.user]
        self._size -= 1
        return True

    def head(self) -> Waiter:
        """The first waiter of the user with the smallest counter (ties: user id); the queue must not be empty."""
        user = min(self._by_user, key=lambda u: (self._counters.get(u), u))
        return self._by_user[user][0]

    def in_order(self) -> Iterator[Waiter]:
        """Each user's first waiter, smallest counter first (ties: user id)."""
        users = sorted(self._by_user, key=lambda u: (self._counters.get(u), u))
        for user in users:
            yield self._by_user[user][0]

    def depth(self, user: UserId) -> int:
        line = self._by_user.get(user)
        return len(line) if line else 0
