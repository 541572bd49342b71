"""Adaptive admission over stub engines: the gateway holds what the engine cannot run, fairly, and only then."""

from __future__ import annotations

import asyncio

from tests.loopback.conftest import fast_settings, start_cluster, wait_until

LONG = "lorem ipsum " * 200


def chat(user: str, tag: str) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": f"{tag} {LONG}"}], "max_tokens": 2, "user": user}


async def test_saturated_engine_makes_the_gateway_hold_serve_light_users_first_and_let_go():
    async with start_cluster(1, fast_settings()) as cluster:  # default settings: adaptive, cap 64
        engine = cluster.engines[0]
        engine.behaviour.delay_s = 0.05
        engine.behaviour.max_running = 2  # the engine runs 2 at once and queues the rest, as vLLM does when full
        router = cluster.gateway.router
        pod = next(iter(cluster.gateway.pods))
        assert router.limits.limit(pod) == 64
        sent: list[str] = []
        stop = asyncio.Event()

        async def send(user: str, tag: str) -> None:
            sent.append(tag)
            async with await cluster.post("/v1/chat/completions", chat(user, tag)) as r:
                assert r.status == 200

        async def heavy_client(c: int) -> None:
            k = 0
            while not stop.is_set():
                await send("heavy", f"heavy-{c}-{k}")
                k += 1

        async def steady_client() -> None:
            k = 0
            while not stop.is_set():
                await send("steady", f"steady-{k}")
                k += 1

        # A user with one request at a time keeps the heavy user ahead of someone: only a user
        # ahead of others is held to the limit (alone, its surplus waits in the engine as well).
        heavy = [asyncio.create_task(heavy_client(c)) for c in range(8)] + [asyncio.create_task(steady_client())]
        try:
            # The engine's waiting queue grows; the gateway shrinks the pod's limit and starts holding requests.
            await wait_until(lambda: router.limits.limit(pod) <= 3 and len(router.queue) >= 4)
            seen = {c["body"]["messages"][0]["content"].split()[0] for c in engine.calls}
            held = [tag for tag in sent if tag not in seen]
            assert len(held) >= 4
            light = [asyncio.create_task(send("light", f"light-{i}")) for i in range(2)]
            await asyncio.gather(*light)
            order = [c["body"]["messages"][0]["content"].split()[0] for c in engine.calls]
            # Held at the gateway, the light user's requests go ahead of the heavy
            # requests already waiting there; first-come first-served (inside the
            # engine) would run every one of those first.
            last_light = max(order.index("light-0"), order.index("light-1"))
            passed_over = [tag for tag in held if tag not in order[: last_light + 1]]
            assert len(passed_over) >= 3, (held, order)
            assert engine.waiting <= 2, "the surplus waits at the gateway, not in the engine"
        finally:
            stop.set()
            await asyncio.gather(*heavy)
        # The queue drains, the engine idles: the limit goes back to the cap.
        await wait_until(lambda: router.limits.limit(pod) == 64 and not len(router.queue))
        scrape = await cluster.http.get(cluster.url + "/metrics")
        assert f'kvgate_pod_concurrency_limit{{pod="{pod.id}"}} 64.0' in await scrape.text()

        # An engine that keeps up is never held from: a burst of 10 all reach it at once.
        engine.behaviour.max_running = None
        engine.behaviour.delay_s = 0.5
        burst = [asyncio.create_task(send("light", f"burst-{i}")) for i in range(10)]
        await wait_until(lambda: engine.running == 10)
        assert len(router.queue) == 0
        await asyncio.gather(*burst)


async def test_a_user_alone_on_a_saturated_engine_is_not_held_at_the_gateway():
    async with start_cluster(1, fast_settings()) as cluster:
        engine = cluster.engines[0]
        engine.behaviour.delay_s = 0.05
        engine.behaviour.max_running = 2
        router = cluster.gateway.router
        pod = next(iter(cluster.gateway.pods))
        stop = asyncio.Event()
        queued: list[int] = []

        async def client(c: int) -> None:
            k = 0
            while not stop.is_set():
                async with await cluster.post("/v1/chat/completions", chat("alone", f"alone-{c}-{k}")) as r:
                    assert r.status == 200
                queued.append(len(router.queue))
                k += 1

        clients = [asyncio.create_task(client(c)) for c in range(8)]
        try:
            # The engine queues: the limit falls, yet nobody is served more than another active
            # user, so holding would only add latency; the requests go on to the engine.
            await wait_until(lambda: router.limits.limit(pod) <= 3 and engine.waiting >= 4)
            await wait_until(lambda: len(queued) >= 30)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert max(queued) == 0
