"""Several gateway replicas over one set of stub engines share routing state through a real Redis.

Each test runs its own redis-server on a free port, so it can kill and restart
it; the replicas are in-process gateways (one is a real `kvgate serve`
process, to be SIGKILLed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import redis

from kvgate.stub_engine import StubEngine, run_app, run_stub
from router.app import GATEWAY, RUNNER_OPTIONS, create_app
from router.discovery import StaticDiscovery
from router.gateway import Gateway
from router.state import codec
from tests.loopback.conftest import fast_settings, heard_each_other, wait_until


@dataclass
class Replica:
    url: str
    gateway: Gateway


@dataclass
class Fleet:
    replicas: list[Replica]
    engines: list[StubEngine]
    http: aiohttp.ClientSession

    async def chat(self, replica: int, content: str, *, user: str = "u", system: str = "") -> str:
        payload = {
            "model": "tiny-llama",
            "max_tokens": 2,
            "user": user,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
        }
        async with self.http.post(self.replicas[replica].url + "/v1/chat/completions", json=payload) as r:
            assert r.status == 200, await r.text()
            return r.headers["x-kvgate-pod"]


def replica_settings(state_url: str | None, *, lease_s: float = 1.0, **admission):
    settings = fast_settings(**admission)
    settings.state.url = state_url
    settings.state.lease_s = lease_s
    settings.state.cluster = "test"
    settings.state.warmup_timeout_s = 2.0
    # A loaded test machine can stall a flush past the default 50 ms; these tests are about
    # what replicas share, not about going on without the store (test_replica_state_faults).
    settings.state.flush_timeout_s = 2.0
    return settings


@contextlib.asynccontextmanager
async def fleet(
    state_url: str | None, *, replicas: int = 2, pods: int = 3, seed: int = 0, **admission
) -> AsyncIterator[Fleet]:
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(run_stub(StubEngine())) for _ in range(pods)]
        members = []
        for i in range(replicas):
            app = create_app(
                replica_settings(state_url, **admission),
                discovery=StaticDiscovery([e.url for e in engines]),
                rng=random.Random(seed + i),
            )
            url = await stack.enter_async_context(run_app(app, **RUNNER_OPTIONS))
            members.append(Replica(url, app[GATEWAY]))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        for member in members:
            await wait_until(lambda m=member: m.gateway.ready() and all(p.models for p in m.gateway.pods), timeout=10)
        yield Fleet(members, engines, http)


async def test_a_new_prefix_sent_alternately_to_two_replicas_stays_on_one_pod(redis_server):
    async with fleet(redis_server.url) as f:

        def counts() -> list[tuple[float, float]]:
            return [
                (m.gateway.state.metrics.events.labels("sent")._value.get(),
                 m.gateway.state.metrics.events.labels("received")._value.get())
                for m in f.replicas
            ]  # fmt: skip

        def settled(before: list[tuple[float, float]]) -> bool:
            # Every event a replica sent since `before` has reached the other (zero in flight alone
            # also holds before it has), and the release it carried has been applied.
            idle = all(p.fleet_in_flight == 0 and p.fleet_pending_prefill == 0 for m in f.replicas for p in m.gateway.pods)
            return heard_each_other(before, counts()) and idle

        for group in range(4):
            system = f"Group {group} house rules, to be followed to the letter. " * 30
            pods = set()
            for i in range(6):
                before = counts()
                pods.add(await f.chat(i % 2, f"question {i}", system=system))
                # The stub answers at once: let the release reach the other replica (one stream
                # delivery) before the next request, as it has long before with a real engine.
                await wait_until(lambda: settled(before))
            assert len(pods) == 1, (group, pods)
        # Both replicas count the prefixes' blocks as reused on their pods, whichever replica routed the reuse.
        for member in f.replicas:
            index = member.gateway.index
            assert sum(index.reused_share(pod.id) for pod in member.gateway.pods) > 0


async def test_an_answer_reaches_its_client_only_once_the_store_holds_its_release(redis_server):
    """A client's next request may reach another replica at once: the store must already have the release.

    Each request starts with the store holding back writes for a while (as a
    slow store would), and the store is read the moment the answer is in,
    without letting the event loop run (a blocking client).
    """
    store = redis.Redis.from_url(redis_server.url)

    def releases() -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, fields in store.xrange("kvgate:test:events"):
            for event in codec.decode(fields[b"e"]):
                if event[0] == codec.RELEASED:
                    counts[event[1]] = counts.get(event[1], 0) + 1
        return counts

    try:
        async with fleet(redis_server.url) as f:
            for i in range(8):
                stream = i % 4 >= 2
                payload = {"model": "tiny-llama", "max_tokens": 2, "stream": stream,
                           "messages": [{"role": "user", "content": f"question {i}"}]}  # fmt: skip
                before = releases()
                store.execute_command("CLIENT", "PAUSE", 200, "WRITE")
                async with f.http.post(f.replicas[i % 2].url + "/v1/chat/completions", json=payload) as r:
                    assert r.status == 200, await r.text()
                    body = await r.read()
                    pod = r.headers["x-kvgate-pod"]
                assert (b"[DONE]" in body) == stream
                after = releases()
                assert after.get(pod, 0) == before.get(pod, 0) + 1, (i, stream, before, after)
    finally:
        store.close()


async def test_without_shared_state_the_replicas_split_prefixes():
    """The same traffic without `--state-url`: the second replica does not know where the first put a prefix."""
    async with fleet(None, seed=3) as f:
        split = 0
        for group in range(4):
            system = f"Group {group} house rules, to be followed to the letter. " * 30
            pods = {await f.chat(i % 2, f"question {i}", system=system) for i in range(6)}
            split += len(pods) > 1
        assert split >= 1


async def test_in_flight_counts_and_user_counters_are_seen_by_every_replica(redis_server):
    async with fleet(redis_server.url) as f:
        for engine in f.engines:
            engine.behaviour.delay_s = 0.5
        a, b = (m.gateway for m in f.replicas)
        task = asyncio.create_task(f.chat(0, "hello", user="alice"))
        await wait_until(lambda: sum(p.fleet_in_flight for p in b.pods) == 1)
        busy = next(p for p in b.pods if p.fleet_in_flight)
        assert busy.in_flight == 0 and busy.peer.in_flight == 1, "replica b counts a's request as a peer's"
        await wait_until(lambda: b.counters.get("alice") > 0 and b.counters.get("alice") == a.counters.get("alice"))
        await task
        await wait_until(lambda: all(p.fleet_in_flight == 0 and p.fleet_pending_prefill == 0 for p in b.pods))


async def test_a_replicas_queue_serves_first_the_user_its_peers_served_least(redis_server):
    """Each replica queues its own requests, by the fleet's counters: service got through another replica counts."""
    async with fleet(redis_server.url, pods=1, max_inflight_per_pod=1) as f:
        a, b = (m.gateway for m in f.replicas)
        [engine] = f.engines
        for i in range(3):
            await f.chat(0, f"warm-up {i}", user="heavy")  # served through replica a only
        await wait_until(lambda: b.counters.get("heavy") > 0 and b.counters.get("heavy") == a.counters.get("heavy"))
        engine.behaviour.delay_s = 0.5
        blocker = asyncio.create_task(f.chat(0, "blocker", user="blocker"))
        await wait_until(lambda: engine.running == 1 and all(p.fleet_in_flight == 1 for p in b.pods))
        heavy = asyncio.create_task(f.chat(1, "heavy again", user="heavy"))
        await wait_until(lambda: len(b.router.queue) == 1)
        light = asyncio.create_task(f.chat(1, "light", user="light"))
        await wait_until(lambda: len(b.router.queue) == 2)
        await asyncio.gather(blocker, heavy, light)
        served = [call["body"]["messages"][-1]["content"] for call in engine.calls]
        assert served[-2:] == ["light", "heavy again"]


async def test_the_store_dying_mid_run_serves_every_request_and_recovers(redis_server):
    async with fleet(redis_server.url) as f:
        a, b = (m.gateway for m in f.replicas)
        registry = a.metrics.registry

        async def traffic(n: int) -> None:
            for i in range(n):
                await f.chat(i % 2, f"q{i}", system="steady traffic " * 20)

        await traffic(4)
        redis_server.kill()
        await traffic(10)  # every request still answered 200 (asserted in chat)
        await wait_until(lambda: registry.get_sample_value("kvgate_state_store_up") == 0)
        assert registry.get_sample_value("kvgate_state_fallbacks_total") >= 1
        redis_server.start()
        await wait_until(lambda: all(m.gateway.metrics.registry.get_sample_value("kvgate_state_store_up") == 1 for m in f.replicas), timeout=15)
        for engine in f.engines:
            engine.behaviour.delay_s = 0.5
        task = asyncio.create_task(f.chat(0, "after the outage"))
        await wait_until(lambda: sum(p.peer.in_flight for p in b.pods) == 1, timeout=5)
        await task


async def test_a_killed_replica_leaves_no_load_once_its_lease_runs_out(redis_server, tmp_path):
    async with contextlib.AsyncExitStack() as stack:
        engine = StubEngine()
        await stack.enter_async_context(run_stub(engine))
        engine.behaviour.delay_s = 3.0  # outlives the lease: only the lease can clear the killed replica's load
        config = tmp_path / "gateway.yaml"
        config.write_text(f"state: {{url: '{redis_server.url}', cluster: test, lease_s: 1.0}}\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvgate", "serve", "--worker-urls", engine.url, "--port", "0", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
            victim = line.split(" ", 1)[1].strip()
            app = create_app(replica_settings(redis_server.url), discovery=StaticDiscovery([engine.url]))
            await stack.enter_async_context(run_app(app, **RUNNER_OPTIONS))
            survivor = app[GATEWAY]
            http = await stack.enter_async_context(aiohttp.ClientSession())
            await wait_until(lambda: survivor.ready(), timeout=10)

            async def victim_ready() -> bool:
                async with http.get(victim + "/ready") as r:
                    return r.status == 200

            for _ in range(200):
                if await victim_ready():
                    break
                await asyncio.sleep(0.05)
            payload = {"model": "tiny-llama", "prompt": "never finishes", "max_tokens": 2}

            async def doomed() -> None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.post(victim + "/v1/completions", json=payload) as r:
                        await r.read()

            pending = asyncio.create_task(doomed())
            await wait_until(lambda: sum(p.peer.in_flight for p in survivor.pods) == 1, timeout=10)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await pending
            await wait_until(lambda: sum(p.peer.in_flight for p in survivor.pods) == 0, timeout=10)
            assert all(p.peer.pending_prefill == 0 for p in survivor.pods)
            await wait_until(lambda: engine.running == 0, timeout=10)  # the stub's own handler, before it stops
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
