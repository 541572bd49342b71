"""Anticipatory admission: a freed slot is kept briefly for the user who just freed it.

Most clients are closed loops: a chat UI, an agent or a batch script sends its
next request a few milliseconds after the last one ends. When every pod is
full, the slot a request frees goes at once to the head of the admission
queue; the user whose request just ended is not in the queue yet, so its next
request waits for another slot to free, however small its VTC counter. Under
load slots free in bursts (requests that started together end together), so
that wait is often a whole request's time, and a user with few clients gets
little more than its share of clients, whatever the counters say.

So, as the anticipatory disk scheduler keeps the disk idle a moment for the
process that just read (Iyer and Druschel, SOSP'01), a slot freed while
others wait is kept for its user for up to `hold_s` when that user would be
served before every waiter (its counter is smaller than theirs) and its last
request came within `hold_s` of the one before it ended (it is a closed loop,
not a user that sent once). The user's next request takes the slot (on any
pod: the kept slot is given back when it lands elsewhere); if it does not
come in time, the slot goes to the queue. A user whose hold lapsed gets none
until it again comes back in time, so open-loop users cost nothing.

Callers: `router.routing.Router` tells `released` of each release, reads `held`
when it counts a pod's free slots for a user, and calls `took` when a user is
handed a lease. Not here: whether a user would be served first (the router
compares counters), or the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from router.pods import PodId, UserId

#: Users remembered per table (their last release, whether they return); the oldest are forgotten first.
_MAX_USERS = 65_536


@dataclass(slots=True, eq=False)
class _Hold:
    user: UserId
    pod: PodId
    timer: asyncio.TimerHandle | None = None


class SlotHolds:
    """Slots kept for returning users (as many per user as its requests that ended while it went first).

    Args:
        hold_s: how long a slot is kept (0: never).
        lapsed: called when a hold ends unused (the router hands the slot to the queue).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, hold_s: float, lapsed: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self._lapsed = lapsed
        self._clock = clock
        self._holds: dict[UserId, list[_Hold]] = {}
        self._per_pod: dict[PodId, int] = {}
        self._released_at: dict[UserId, float] = {}
        self._returns: dict[UserId, None] = {}
        """Users whose last request came within `hold_s` of their previous release."""

    def __len__(self) -> int:
        return sum(self._per_pod.values())

    def __bool__(self) -> bool:
        return bool(self._holds)

    def arrived(self, user: UserId) -> None:
        """A request of `user` arrived: note whether it came back within `hold_s` of its last release."""
        released = self._released_at.pop(user, None)
        if released is None:
            return  # its first request, or a retry, or another client of its while one runs
        if self._clock() - released <= self.hold_s:
            _remember(self._returns, user, None)
        else:
            self._returns.pop(user, None)

    def released(self, user: UserId, pod: PodId, *, first: bool) -> bool:
        """`user`'s request on `pod` ended; keep its slot if `first` and it comes back in loops.

        Args:
            first: others wait, and `user` would be served before every one of them.

        Returns:
            Whether the slot is now kept (the caller then does not hand it to the queue).
        """
        _remember(self._released_at, user, self._clock())
        if not first or self.hold_s <= 0 or user not in self._returns:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        hold = _Hold(user, pod)
        hold.timer = loop.call_later(self.hold_s, self._lapse, hold)
        self._holds.setdefault(user, []).append(hold)
        self._per_pod[pod] = self._per_pod.get(pod, 0) + 1
        return True

    def held(self, pod: PodId, user: UserId | None = None) -> int:
        """Slots of `pod` kept for users other than `user`."""
        count = self._per_pod.get(pod, 0)
        if count and user is not None:
            count -= sum(1 for hold in self._holds.get(user, ()) if hold.pod == pod)
        return count

    def took(self, user: UserId, pod: PodId) -> None:
        """`user` was handed a lease on `pod`: one of its kept slots is used (one on `pod` if it has one;
        another pod's is given back)."""
        holds = self._holds.get(user)
        if not holds:
            return
        hold = next((h for h in holds if h.pod == pod), holds[0])
        self._end(hold)

    def forget_pod(self, pod: PodId) -> None:
        """`pod` left the table: its kept slots are gone."""
        for holds in list(self._holds.values()):
            for hold in [h for h in holds if h.pod == pod]:
                self._end(hold)

    def _lapse(self, hold: _Hold) -> None:
        if self._end(hold):
            self._returns.pop(hold.user, None)
            self._lapsed()

    def _end(self, hold: _Hold) -> bool:
        holds = self._holds.get(hold.user)
        if not holds or hold not in holds:
            return False
        holds.remove(hold)
        if not holds:
            del self._holds[hold.user]
        left = self._per_pod[hold.pod] - 1
        if left:
            self._per_pod[hold.pod] = left
        else:
            del self._per_pod[hold.pod]
        if hold.timer is not None:
            hold.timer.cancel()
        return True


def _remember(table: dict, key: object, value: object) -> None:
    """Set `table[key]` as its most recent entry, forgetting the oldest beyond `_MAX_USERS`."""
    table.pop(key, None)
    table[key] = value
    if len(table) > _MAX_USERS:
        del table[next(iter(table))]
