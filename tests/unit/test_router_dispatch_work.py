"""Releasing a slot costs the router work bounded by the pods, not by the queue."""

from __future__ import annotations

import asyncio

from tests.unit.test_router_routing import Fleet


async def test_a_release_under_saturation_does_not_try_every_waiting_user():
    fleet = Fleet(2, max_inflight=1, max_queue=500)
    policy = fleet.book.get("least-request")
    held = [fleet.router.try_acquire(fleet.request(user="holder"), policy, "least-request") for _ in range(2)]
    assert all(held)
    waiting = [
        asyncio.create_task(fleet.router.acquire(fleet.request(user=f"user-{i}"), policy, "least-request"))
        for i in range(400)
    ]
    await asyncio.sleep(0)  # a yield, not a wait: every new task runs up to its wait in the queue
    assert len(fleet.router.queue) == 400

    tries = 0
    try_acquire = fleet.router.try_acquire

    def counted(*args, **kwargs):
        nonlocal tries
        tries += 1
        return try_acquire(*args, **kwargs)

    fleet.router.try_acquire = counted  # type: ignore[method-assign]
    try:
        held[0].release()  # one slot frees: one waiter gets it, and nobody else can fit

        assert len(fleet.router.queue) == 399
        assert tries <= 2, f"one release tried to place {tries} waiters"
    finally:
        for task in waiting:
            task.cancel()
        for result in await asyncio.gather(*waiting, return_exceptions=True):
            if not isinstance(result, BaseException):
                result.release()
        held[1].release()
