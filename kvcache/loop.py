"""An asyncio event loop on a thread of its own, for synchronous callers.

vLLM calls its KV connector synchronously, from the scheduler loop and from
the model runner; the store is async (grpc.aio, redis.asyncio). A `LoopThread`
owns one event loop on a daemon thread: `run` waits for a coroutine with a
deadline, `submit` fires one and returns its future. Everything the store
touches lives on that loop, so the store needs no locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class LoopThread:
    """One event loop running on a daemon thread.

    Args:
        name: thread name (shows in stack dumps).
    """

    def __init__(self, name: str = "kvcache-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop (for `call_soon_threadsafe` and the like)."""
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule `coro` on the loop and return its future at once."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run `coro` on the loop and wait for its result.

        Args:
            coro: the coroutine.
            timeout: seconds to wait; on expiry the coroutine is cancelled.

        Raises:
            TimeoutError: no result within `timeout`.
            Exception: whatever the coroutine raised.
        """
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop and join the thread (pending tasks are cancelled)."""
        if not self._thread.is_alive():
            return

        async def _cancel_rest() -> None:
            current = asyncio.current_task()
            rest = [task for task in asyncio.all_tasks() if task is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.run(_cancel_rest(), timeout)
        except TimeoutError:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
