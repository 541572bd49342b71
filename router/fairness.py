"""Virtual token counters (VTC, OSDI'24): per-user service received, in weighted tokens.

A user's counter grows by `input_weight` per prompt token when a request is
dispatched and by `output_weight` per generated token as output is produced.
When a user with nothing waiting or running arrives, its counter is lifted to
the smallest counter among users that are active, so that idling does not bank
credit to spend later in a burst. The admission queue serves the user with the
smallest counter first; the `vtc-basic` policy reads the counters too.

Not here: the queue itself (`router.admission`).
"""

from __future__ import annotations

from collections import Counter

from router.pods import UserId


class VirtualTokenCounters:
    """Counters per user, plus which users are active (queued or in flight).

    Args:
        input_weight: cost of one prompt token.
        output_weight: cost of one generated token.
    """

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self._counters: dict[UserId, float] = {}
        self._active: Counter[UserId] = Counter()
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
            floor = min((self._counters.get(u, 0.0) for u, n in self._active.items() if n > 0), default=None)
            if floor is not None:
                self._counters[user] = max(self._counters.get(user, 0.0), floor)
            else:
                self._counters.setdefault(user, 0.0)
        self._active[user] += 1

    def leave(self, user: UserId) -> None:
        """Mark one request of `user` as finished (served, failed or abandoned)."""
        left = self._active[user] - 1
        if left > 0:
            self._active[user] = left
        else:
            del self._active[user]

    def charge(self, user: UserId, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add service received by `user`."""
        cost = self.input_weight * input_tokens + self.output_weight * output_tokens
        if cost:
            self._counters[user] = self._counters.get(user, 0.0) + cost
            self._served[user] = self._served.get(user, 0.0) + cost

    def active_users(self) -> int:
        return len(self._active)
