"""Routing through the gateway: prefixes stick to their pod, headers pick the policy."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.loopback.conftest import fast_settings, start_cluster


def chat(system: str, question: str) -> dict:
    return {
        "model": "tiny-llama",
        "max_tokens": 2,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }


async def _pod(cluster, payload, **headers) -> str:
    async with await cluster.post("/v1/chat/completions", payload, headers=headers or None) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-kvgate-pod"]


@pytest.mark.parametrize("policy", ["prefix-cache", "kv-aware"])
async def test_requests_sharing_a_long_prefix_go_where_it_is_cached(policy):
    async with start_cluster(3) as cluster:
        systems = [f"You are assistant number {g}. " + "Follow the house rules carefully. " * 40 for g in range(3)]
        homes: dict[int, set[str]] = {g: set() for g in range(3)}
        for i in range(18):
            g = i % 3
            homes[g].add(await _pod(cluster, chat(systems[g], f"question {i}"), **{"x-routing-strategy": policy}))
        assert all(len(pods) == 1 for pods in homes.values()), homes
        # and the groups did not all pile onto one pod
        assert len(set().union(*homes.values())) >= 2


async def test_round_robin_header_alternates_pods():
    async with start_cluster(2) as cluster:
        pods = [await _pod(cluster, chat("same", "same"), **{"x-routing-strategy": "round-robin"}) for _ in range(6)]
        assert pods[0::2] == [pods[0]] * 3 and pods[1::2] == [pods[1]] * 3 and pods[0] != pods[1]


async def test_session_affinity_keeps_a_session_on_one_pod():
    async with start_cluster(3) as cluster:
        seen: dict[str, set[str]] = {}
        for i in range(24):
            key = f"s{i % 6}"
            pod = await _pod(cluster, chat("x", f"q{i}"), **{"x-routing-strategy": "session-affinity", "x-session-id": key})
            seen.setdefault(key, set()).add(pod)
        assert all(len(pods) == 1 for pods in seen.values())
        assert len(set().union(*seen.values())) >= 2


async def test_a_burst_spreads_over_pods_even_with_one_shared_prefix():
    """Select and count in one step: 12 simultaneous requests do not all land on the prefix holder."""
    async with start_cluster(3) as cluster:
        for engine in cluster.engines:
            engine.behaviour.delay_s = 0.2
        system = "Shared preamble. " * 60
        await _pod(cluster, chat(system, "warm"))
        pods = await asyncio.gather(*(_pod(cluster, chat(system, f"q{i}"), **{"x-routing-strategy": "least-request"}) for i in range(12)))
        counts = sorted(pods.count(p) for p in set(pods))
        assert counts == [4, 4, 4], counts


async def test_weighted_mix_header_changes_the_routing():
    """A mix led by round-robin alternates pods where the default policy would keep the prefix on one."""
    async with start_cluster(2) as cluster:
        same = chat("a shared preamble. " * 40, "the same question")
        default = [await _pod(cluster, same) for _ in range(4)]
        assert len(set(default)) == 1, "without the header the prefix stays on its pod"
        mixed = [await _pod(cluster, same, **{"x-routing-strategy": "round-robin:3,least-request:1"}) for _ in range(4)]
        assert len(set(mixed)) == 2, mixed
        decisions = cluster.gateway.metrics.registry.get_sample_value
        assert sum(
            decisions("kvgate_requests_total", {"pod": pod, "policy": "mix", "status": "200"}) or 0
            for pod in set(mixed)
        ) == 4, "the mix is counted under its own label"


async def test_the_decision_log_says_where_each_request_went_and_what_it_matched(tmp_path):
    settings = fast_settings()
    settings.routing.decision_log = tmp_path / "decisions.jsonl"
    system = "Follow the house rules carefully. " * 60
    async with start_cluster(2, settings) as cluster:
        served = [await _pod(cluster, chat(system, f"question {i}"), **{"x-user-id": f"u{i}"}) for i in range(4)]
    # The gateway stopped: its log is closed and complete.
    lines = [json.loads(line) for line in settings.routing.decision_log.read_text().splitlines()]
    assert [line["pod"] for line in lines] == served
    assert [line["user"] for line in lines] == ["u0", "u1", "u2", "u3"]
    assert all(not line["waits"] and len(line["candidates"]) == 2 for line in lines)
    assert lines[0]["matched_tokens"] == 0 and all(line["matched_tokens"] >= 128 for line in lines[1:])
