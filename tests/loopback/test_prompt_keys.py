"""Through the gateway: salts, adapters and tools key requests apart; what cannot be keyed is routed unmatched."""

from __future__ import annotations

from typing import Any

from tests.loopback.conftest import Cluster, start_cluster

SYSTEM = "You are assistant number one. " + "Follow the house rules carefully. " * 40


def chat(model: str = "tiny-llama", **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 2,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}],
        **fields,
    }


def matched_tokens(cluster: Cluster) -> float:
    return cluster.gateway.metrics.registry.get_sample_value("kvgate_matched_prefix_tokens_sum") or 0.0


async def send(cluster: Cluster, body: dict[str, Any]) -> float:
    """Send `body`; the prefix tokens the gateway matched for it."""
    before = matched_tokens(cluster)
    async with await cluster.post("/v1/chat/completions", body) as response:
        assert response.status == 200, await response.text()
    return matched_tokens(cluster) - before


async def test_requests_with_another_salt_or_adapter_or_tools_get_no_prefix_match() -> None:
    async with start_cluster(2, adapters=("sql-lora",)) as cluster:
        assert await send(cluster, chat(cache_salt="tenant-a")) == 0
        assert await send(cluster, chat(cache_salt="tenant-a")) > 0  # the same salt matches
        assert await send(cluster, chat(cache_salt="tenant-b")) == 0
        assert await send(cluster, chat()) == 0
        assert await send(cluster, chat("sql-lora")) == 0  # the adapter's blocks are not the base model's
        assert await send(cluster, chat("sql-lora")) > 0
        assert await send(cluster, chat(tools=[{"type": "function", "function": {"name": "f"}}])) == 0


async def test_a_request_template_is_routed_unmatched_and_counted() -> None:
    async with start_cluster(2) as cluster:
        assert await send(cluster, chat()) == 0
        assert await send(cluster, chat()) > 0
        assert await send(cluster, chat(chat_template="{{ messages }}")) == 0
        count = cluster.gateway.metrics.registry.get_sample_value("kvgate_prompt_unkeyed_total", {"reason": "chat_template"})
        assert count == 1
        # and the engine got the request as sent
        assert any(call["body"].get("chat_template") == "{{ messages }}" for e in cluster.engines for call in e.calls)


async def test_malformed_prompt_fields_are_openai_400s() -> None:
    async with start_cluster(1) as cluster:
        for fields, param in (
            ({"chat_template_kwargs": "thinking"}, "chat_template_kwargs"),
            ({"cache_salt": 42}, "cache_salt"),
        ):
            async with await cluster.post("/v1/chat/completions", chat(**fields)) as response:
                assert response.status == 400
                error = (await response.json())["error"]
                assert error["type"] == "invalid_request_error" and error["param"] == param
        assert cluster.engines[0].calls == []
