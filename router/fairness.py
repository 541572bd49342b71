"""Virtual token counters (VTC, OSDI'24): per-user service received, in weighted tokens.

A user's counter grows by `input_weight` per prompt token when a request is
dispatched and by `output_weight` per generated token as output is produced.
When a user with nothing waiting or running arrives, its counter is lifted to
the smallest counter among users that are active, so that idling does not bank
credit to spend later in a burst. The admission queue serves the user with the
smallest counter first; the `vtc-basic` policy reads the counters too.

User ids come from clients (the `user` field, a header, the API key), so only
the `max_idle_users` most recently active idle users keep their counters; an
older one coming back starts from the floor, as a new user does.

Not here: the queue itself (`router.admission`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Protocol

from router.pods import UserId


class CounterObserver(Protocol):
    """Hears what this replica's counters did, to tell other replicas."""

    def charged(self, user: UserId, cost: float) -> None: ...

    def activity(self, user: UserId, active: int) -> None: ...


class VirtualTokenCounters:
    """Counters per user, plus which users are active (queued or in flight).

    Args:
        input_weight: cost of one prompt token.
        output_weight: cost of one generated token.
        max_idle_users: idle users whose counters are kept (least recently active forgotten first);
            bounds memory however many distinct user ids clients send.
    """

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0, max_idle_users: int = 65_536) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.max_idle_users = max_idle_users
        self._counters: dict[UserId, float] = {}
        self._active: Counter[UserId] = Counter()
        self._idle: OrderedDict[UserId, None] = OrderedDict()
        self._peer_active: dict[UserId, int] = {}
        self.observer: CounterObserver | None = None
        """Told of every charge and activity change (the shared state, with gateway replicas)."""
        self._served: dict[UserId, float] = {}

    def get(self, user: UserId) -> float:
        return self._counters.get(user, 0.0)

    def snapshot(self) -> dict[UserId, float]:
        return dict(self._counters)

    def served(self) -> dict[UserId, float]:
        """Weighted tokens each user has received, never lifted (for service shares)."""
        return dict(self._served)

    def arrive(self, user: UserId) -> None:
        """Mark one more request of `user` as active, lifting its counter first if it was idle."""
        if self._active[user] == 0:
            self._idle.pop(user, None)
        if self._active[user] == 0 and not self._peer_active.get(user):
            busy = [u for u, n in self._active.items() if n > 0] + list(self._peer_active)
            floor = min((self._counters.get(u, 0.0) for u in busy), default=None)
            current = self._counters.get(user, 0.0)
            if floor is not None and floor > current:
                self._counters[user] = floor
                if self.observer is not None:
                    self.observer.charged(user, floor - current)
            else:
                self._counters.setdefault(user, 0.0)
        self._active[user] += 1
        if self.observer is not None:
            self.observer.activity(user, self._active[user])

    def leave(self, user: UserId) -> None:
        """Mark one request of `user` as finished (served, failed or abandoned)."""
        left = self._active[user] - 1
        if left > 0:
            self._active[user] = left
        else:
            del self._active[user]
            self._forget_idle(user)
        if self.observer is not None:
            self.observer.activity(user, max(left, 0))

    def charge(self, user: UserId, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add service received by `user`."""
        cost = self.cost(input_tokens=input_tokens, output_tokens=output_tokens)
        if cost:
            self._counters[user] = self._counters.get(user, 0.0) + cost
            self._served[user] = self._served.get(user, 0.0) + cost
            if self.observer is not None:
                self.observer.charged(user, cost)

    def add(self, user: UserId, cost: float) -> None:
        """Add `cost` another replica charged (no notification: it is the peer's news)."""
        if cost:
            self._counters[user] = self._counters.get(user, 0.0) + cost
            if not self._active.get(user):
                self._forget_idle(user)

    def _forget_idle(self, user: UserId) -> None:
        """Note `user` as idle, forgetting the least recently active idle users beyond the bound."""
        self._idle[user] = None
        self._idle.move_to_end(user)
        while len(self._idle) > self.max_idle_users:
            forgotten, _ = self._idle.popitem(last=False)
            self._counters.pop(forgotten, None)
            self._served.pop(forgotten, None)

    def set_peer_active(self, user: UserId, count: int) -> None:
        """Requests of `user` active on other replicas (they count for the lift on arrival)."""
        if count > 0:
            self._peer_active[user] = count
        else:
            self._peer_active.pop(user, None)

    def least_active(self) -> float | None:
        """The smallest counter among users with requests waiting or running (here or on other replicas)."""
        counters = self._counters
        least = min((counters.get(u, 0.0) for u in self._active), default=None)
        if self._peer_active:
            peers = min(counters.get(u, 0.0) for u in self._peer_active)
            least = peers if least is None else min(least, peers)
        return least

    def cost(self, *, input_tokens: int = 0, output_tokens: int = 0) -> float:
        """What serving that many tokens adds to a counter."""
        return self.input_weight * input_tokens + self.output_weight * output_tokens

    def active_users(self) -> int:
        return len(self._active)
