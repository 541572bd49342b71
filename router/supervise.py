"""Keeps the gateway's background work alive: a guard per step, a supervisor per task.

The gateway runs long-lived tasks beside the request path: one health and
scrape loop per pod (`router.monitor`) and the discovery task
(`router.gateway`). An exception escaping such a task would end it silently
(asyncio only logs it when the task is garbage-collected), leaving a pod
forever "up" or "down" or the pod list frozen. So:

- `Guard.run(step)` runs one step of a loop and turns any exception into a
  log line (with its traceback the first time a kind is seen, a debug line
  after that) and a count in `kvgate_background_errors_total{task,kind}`;
  the loop goes on.
- `supervise(...)` runs a coroutine factory as a task body and restarts it,
  with a capped exponential backoff, whenever it raises or returns; each
  restart is counted in the same metric.

Cancellation always passes through: stopping the gateway stops these tasks.
Not here: what a failed step means for a pod (the monitor decides that).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

T = TypeVar("T")


class Guard:
    """Catches, logs once per kind and counts what escapes background steps.

    Args:
        registry: where `kvgate_background_errors_total` is registered.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.errors = Counter(
            "kvgate_background_errors",
            "Exceptions caught in the gateway's background tasks (probes, scrapes, discovery), by task and kind.",
            ["task", "kind"],
            registry=registry,
        )
        self._seen: set[tuple[str, str]] = set()

    def record(self, task: str, exc: BaseException, context: str = "") -> None:
        """Count `exc` under `task` and log it: fully the first time its kind is seen, briefly after.

        Args:
            task: a bounded label: what kind of work failed ("probe", "scrape", "discovery").
            exc: the exception.
            context: what it was working on (a pod URL), for the log only.
        """
        kind = type(exc).__name__
        self.errors.labels(task, kind).inc()
        where = f" ({context})" if context else ""
        if (task, kind) not in self._seen:
            self._seen.add((task, kind))
            log.warning("%s failed%s and goes on: %s: %s", task, where, kind, exc, exc_info=exc)
        else:
            log.debug("%s failed%s again: %s: %s", task, where, kind, exc)

    async def run(self, task: str, step: Awaitable[T], context: str = "") -> T | None:
        """Await `step`; return its value, or None after recording what it raised.

        Cancellation is not caught.
        """
        try:
            return await step
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the whole point: a background step must not end its loop
            self.record(task, exc, context)
            return None


async def supervise(
    task: str,
    body: Callable[[], Awaitable[object]],
    guard: Guard,
    *,
    first_backoff_s: float = 0.1,
    max_backoff_s: float = 10.0,
) -> None:
    """Run `body()` for ever: restart it whenever it raises or returns, until cancelled.

    Args:
        task: name for logs and the metric label.
        body: makes a fresh coroutine each time (e.g. `lambda: discovery.run(on_change)`).
        guard: records what ended each run.
        first_backoff_s: wait before the first restart; doubles per restart in a row.
        max_backoff_s: the longest wait between restarts.

    Side effects: `kvgate_background_errors_total{task,kind}` counts every end,
    kind `returned` for a body that returned while it should run for ever.
    """
    backoff = first_backoff_s
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - restarted, never lost
            guard.record(task, exc)
        else:
            guard.errors.labels(task, "returned").inc()
            log.warning("%s ended by itself; restarting it", task)
        if asyncio.get_running_loop().time() - started > max_backoff_s:
            backoff = first_backoff_s  # it ran a good while: this is a new failure, not the same one
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff_s)
