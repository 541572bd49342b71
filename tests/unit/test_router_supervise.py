"""Background work that fails is logged once per kind, counted, and goes on (or is restarted)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from router.supervise import Guard, supervise


def counted(registry: CollectorRegistry, task: str, kind: str) -> float:
    return registry.get_sample_value("kvgate_background_errors_total", {"task": task, "kind": kind}) or 0.0


async def fail(exc: BaseException) -> None:
    raise exc


async def test_guard_returns_the_value_or_none_and_counts_each_failure(caplog):
    registry = CollectorRegistry()
    guard = Guard(registry)

    async def answer() -> int:
        return 42

    with caplog.at_level(logging.DEBUG, logger="router.supervise"):
        assert await guard.run("probe", answer()) == 42
        for _ in range(3):
            assert await guard.run("probe", fail(AttributeError("'list' object has no attribute 'get'")), "pod-a") is None
        assert await guard.run("probe", fail(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")), "pod-a") is None

    assert counted(registry, "probe", "AttributeError") == 3
    assert counted(registry, "probe", "UnicodeDecodeError") == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.exc_info[0] for r in warnings] == [AttributeError, UnicodeDecodeError]  # once per kind, with the traceback


async def test_guard_lets_cancellation_through():
    guard = Guard(CollectorRegistry())

    with pytest.raises(asyncio.CancelledError):
        await guard.run("probe", fail(asyncio.CancelledError()))


async def test_supervisor_restarts_a_body_that_raises_or_returns_until_cancelled():
    registry = CollectorRegistry()
    runs: list[int] = []
    settled = asyncio.Event()

    async def body() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("first run fails")
        if len(runs) == 2:
            return  # ends by itself
        settled.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("discovery", body, Guard(registry), first_backoff_s=0.01))
    await asyncio.wait_for(settled.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert runs == [0, 1, 2]
    assert counted(registry, "discovery", "RuntimeError") == 1
    assert counted(registry, "discovery", "returned") == 1
