"""Fairness: virtual token counters and the admission queue they order."""

from __future__ import annotations

import pytest

from router.admission import AdmissionQueue, Waiter
from router.errors import OverLimit
from router.fairness import VirtualTokenCounters
from router.pods import UserId

ALICE, BOB, CAROL, DAVE = UserId("alice"), UserId("bob"), UserId("carol"), UserId("dave")


# -- counters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "expected"),
    [
        pytest.param(0, 0, 0.0, id="nothing"),
        pytest.param(100, 0, 100.0, id="input-weighs-one"),
        pytest.param(0, 100, 200.0, id="output-weighs-two"),
        pytest.param(30, 20, 70.0, id="both"),
    ],
)
def test_charge_weighs_one_per_input_and_two_per_output_token(input_tokens, output_tokens, expected):
    counters = VirtualTokenCounters()

    counters.charge(ALICE, input_tokens=input_tokens, output_tokens=output_tokens)

    assert counters.get(ALICE) == expected


def test_charges_accumulate_and_weights_are_configurable():
    counters = VirtualTokenCounters(input_weight=0.5, output_weight=3.0)

    counters.charge(ALICE, input_tokens=10)
    counters.charge(ALICE, output_tokens=10)

    assert counters.get(ALICE) == 35.0
    assert counters.get(BOB) == 0.0


def test_arrival_lifts_an_idle_user_to_the_smallest_active_counter():
    counters = VirtualTokenCounters()
    counters.arrive(ALICE)
    counters.arrive(BOB)
    counters.charge(ALICE, input_tokens=100)
    counters.charge(BOB, input_tokens=40)

    counters.arrive(CAROL)  # new: would otherwise start at 0 and jump every queue

    assert counters.get(CAROL) == 40.0
    assert counters.active_users() == 3


def test_arrival_never_lowers_a_counter():
    counters = VirtualTokenCounters()
    counters.charge(ALICE, input_tokens=500)
    counters.arrive(BOB)
    counters.charge(BOB, input_tokens=100)

    counters.arrive(ALICE)

    assert counters.get(ALICE) == 500.0


def test_no_lift_while_already_active():
    counters = VirtualTokenCounters()
    counters.arrive(ALICE)
    counters.charge(ALICE, input_tokens=100)
    counters.arrive(BOB)  # lifted to 100
    counters.charge(ALICE, input_tokens=50)  # alice now 150, bob still 100

    counters.arrive(BOB)  # a second request of an active user

    assert counters.get(BOB) == 100.0


def test_no_lift_when_nobody_is_active():
    counters = VirtualTokenCounters()
    counters.arrive(ALICE)
    counters.charge(ALICE, input_tokens=100)
    counters.leave(ALICE)

    counters.arrive(BOB)

    assert counters.get(BOB) == 0.0
    assert counters.active_users() == 1


def test_a_user_stays_active_until_its_last_request_leaves():
    counters = VirtualTokenCounters()
    counters.arrive(ALICE)
    counters.arrive(ALICE)
    counters.charge(ALICE, input_tokens=80)

    counters.leave(ALICE)
    counters.arrive(BOB)
    assert counters.get(BOB) == 80.0  # alice still counts as active

    counters.leave(ALICE)
    counters.leave(BOB)
    assert counters.active_users() == 0
    counters.arrive(CAROL)
    assert counters.get(CAROL) == 0.0  # departed users lift nobody


def test_snapshot_is_a_copy():
    counters = VirtualTokenCounters()
    counters.charge(ALICE, input_tokens=5)

    snap = counters.snapshot()
    counters.charge(ALICE, input_tokens=5)

    assert snap == {ALICE: 5.0}


# -- admission queue --------------------------------------------------------------------------


def heads(queue: AdmissionQueue) -> list[str]:
    return [w.payload for w in queue.in_order()]


async def test_fifo_within_a_user():
    queue = AdmissionQueue(VirtualTokenCounters(), max_size=10)
    first, second, third = (Waiter(ALICE, f"alice-{i}") for i in range(3))
    for waiter in (first, second, third):
        queue.push(waiter)

    order = []
    while len(queue):
        head = next(queue.in_order())
        order.append(head.payload)
        queue.remove(head)

    assert order == ["alice-0", "alice-1", "alice-2"]


async def test_smallest_counter_first_across_users():
    counters = VirtualTokenCounters()
    counters.charge(ALICE, input_tokens=100)
    counters.charge(CAROL, input_tokens=50)
    queue = AdmissionQueue(counters, max_size=10)
    for user in (ALICE, BOB, CAROL):  # pushed heaviest first
        queue.push(Waiter(user, str(user)))

    assert heads(queue) == ["bob", "carol", "alice"]

    counters.charge(BOB, input_tokens=200)  # order follows the counters as they are now

    assert heads(queue) == ["carol", "alice", "bob"]


async def test_equal_counters_are_ordered_by_user_id():
    queue = AdmissionQueue(VirtualTokenCounters(), max_size=10)
    for user in (DAVE, BOB, CAROL):
        queue.push(Waiter(user, str(user)))

    assert heads(queue) == ["bob", "carol", "dave"]


async def test_in_order_yields_only_each_users_head():
    queue = AdmissionQueue(VirtualTokenCounters(), max_size=10)
    queue.push(Waiter(ALICE, "alice-0"))
    queue.push(Waiter(ALICE, "alice-1"))
    queue.push(Waiter(BOB, "bob-0"))

    assert heads(queue) == ["alice-0", "bob-0"]
    assert (queue.depth(ALICE), queue.depth(BOB), queue.depth(CAROL)) == (2, 1, 0)
    assert len(queue) == 3


async def test_a_full_queue_refuses_with_429():
    queue = AdmissionQueue(VirtualTokenCounters(), max_size=2)
    queue.push(Waiter(ALICE, "a"))
    queue.push(Waiter(BOB, "b"))

    with pytest.raises(OverLimit) as caught:
        queue.push(Waiter(CAROL, "c"))

    assert caught.value.status == 429
    assert len(queue) == 2
    assert queue.depth(CAROL) == 0


async def test_remove_frees_a_place_and_is_idempotent():
    queue = AdmissionQueue(VirtualTokenCounters(), max_size=2)
    a, b = Waiter(ALICE, "a"), Waiter(ALICE, "b")
    queue.push(a)
    queue.push(b)

    assert queue.remove(a) is True
    assert queue.remove(a) is False
    assert queue.remove(Waiter(BOB, "never queued")) is False
    assert len(queue) == 1
    assert heads(queue) == ["b"]

    queue.push(Waiter(CAROL, "c"))  # room again
    assert len(queue) == 2


async def test_removing_a_users_last_waiter_takes_the_user_out_of_the_order():
    queue = AdmissionQueue(VirtualTokenCounters(), max_size=10)
    a, b = Waiter(ALICE, "a"), Waiter(BOB, "b")
    queue.push(a)
    queue.push(b)

    queue.remove(a)

    assert heads(queue) == ["b"]
    assert queue.depth(ALICE) == 0
