"""Fixtures for every test: no asyncio task may outlive its test."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(autouse=True)
async def _no_leaked_tasks():
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    for task in leaked:
        task.cancel()
    assert not leaked, f"test left tasks running: {[t.get_name() for t in leaked]}"
