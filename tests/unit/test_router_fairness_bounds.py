"""Virtual token counters stay bounded however many distinct user ids clients send."""

from __future__ import annotations

from router.fairness import VirtualTokenCounters
from router.pods import UserId


def test_only_the_most_recent_idle_users_keep_their_counters():
    counters = VirtualTokenCounters(max_idle_users=4)
    steady = UserId("steady")
    counters.arrive(steady)
    for i in range(1000):
        user = UserId(f"user-{i}")
        counters.arrive(user)
        counters.charge(user, output_tokens=i)
        counters.leave(user)
    snapshot = counters.snapshot()
    assert len(snapshot) == 5  # the active user and the last four idle ones
    assert steady in snapshot
    assert snapshot[UserId("user-999")] == 2 * 999
    assert UserId("user-0") not in snapshot


def test_an_idle_user_coming_back_keeps_its_counter_while_remembered():
    counters = VirtualTokenCounters(max_idle_users=2)
    heavy = UserId("heavy")
    counters.arrive(heavy)
    counters.charge(heavy, output_tokens=100)
    counters.leave(heavy)
    counters.arrive(heavy)  # back before being forgotten: no credit banked, none lost
    assert counters.get(heavy) == 200
    counters.leave(heavy)
