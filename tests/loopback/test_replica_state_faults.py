"""Faults of the shared routing state: a replica dropped by its peers while alive, a stuck shutdown.

A replica starved for longer than its lease (a long pause, a slow store) is
dropped by its peers; it must then send its whole state again, not go on
sending changes on top of nothing, or the peers undercount it for ever (and
count negative load once its requests end). Real Redis, in-process replicas.
"""

from __future__ import annotations

import asyncio

from tests.loopback.conftest import wait_until
from tests.loopback.test_replicas import fleet


async def test_a_replica_dropped_while_alive_is_counted_again_with_its_whole_load(redis_server):  # noqa: F811
    async with fleet(redis_server.url) as f:
        for engine in f.engines:
            # Outlives the drop by far: the lease (1 s) runs out and the peer checks every third of it.
            engine.behaviour.delay_s = 3.0
        a, b = (m.gateway for m in f.replicas)

        def peer_in_flight() -> list[int]:
            return [p.peer.in_flight for p in b.pods]

        first = asyncio.create_task(f.chat(0, "first", system="one long-running request " * 10))
        await wait_until(lambda: sum(peer_in_flight()) == 1)
        # Replica a stops renewing its lease but keeps serving (as when starved): b drops its load.
        lease = next(t for t in a.state._tasks if t.get_name() == "state lease")
        lease.cancel()
        await wait_until(lambda: sum(peer_in_flight()) == 0, timeout=5)

        second = asyncio.create_task(f.chat(0, "second", system="another long-running request " * 10))
        await wait_until(lambda: sum(peer_in_flight()) == 2, timeout=3)  # both of a's requests, not just the new one
        await asyncio.gather(first, second)
        await wait_until(lambda: sum(peer_in_flight()) == 0, timeout=5)
        assert min(peer_in_flight()) == 0


async def test_stopping_a_replica_returns_even_if_a_blocking_read_swallowed_its_cancellation(redis_server):  # noqa: F811
    async with fleet(redis_server.url, replicas=1) as f:
        state = f.replicas[0].gateway.state
        reading = asyncio.Event()

        async def stubborn_read(*args, **kwargs):
            reading.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # as a blocking read cancelled just when its own timeout fires can do
            await asyncio.sleep(3600)

        state._follower.read = stubborn_read
        await asyncio.wait_for(reading.wait(), timeout=5)
        stopping = asyncio.create_task(state.stop())
        done, _ = await asyncio.wait({stopping}, timeout=10)
        if not done:
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
        assert done, "stop() hung on a loop that swallowed its cancellation"
        assert not state._tasks


async def test_a_replica_that_starts_counts_the_load_its_peers_already_have(redis_server):  # noqa: F811
    async with fleet(redis_server.url, replicas=1) as f:
        for engine in f.engines:
            engine.behaviour.delay_s = 1.5
        busy = asyncio.create_task(f.chat(0, "already running", system="a request in flight " * 10))
        first = f.replicas[0].gateway
        # The request reaches the engine only once its reservation is in the store.
        await wait_until(lambda: sum(e.running for e in f.engines) == 1)
        try:
            async with fleet(redis_server.url, replicas=1, seed=5) as g:
                newcomer = g.replicas[0].gateway
                # The newcomer's pods are other stub engines: compare the load it holds for its peer in total.
                assert newcomer.state._ledger.knows(first.state.replica_id)
                assert sum(row[0] for row in newcomer.state._ledger._load.get(first.state.replica_id, {}).values()) == 1
        finally:
            await busy
