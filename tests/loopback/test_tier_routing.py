"""kv-aware over stub engines that report a KV connector: a busy holder's prefix goes where it can be loaded.

The stubs report external prefix-cache queries (as engines running a KV
connector do), so the gateway prices what the shared cache holds; they send
no KV events, so its belief is the prompts it routed.
"""

from __future__ import annotations

import pytest

from tests.loopback.conftest import fast_settings, start_cluster, wait_until

PROMPT = "Summarise the following report in one line. " + "The quarterly figures were in line with the plan. " * 40


async def _pod(cluster, prompt: str) -> str:
    payload = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 2}
    async with await cluster.post("/v1/completions", payload) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-kvgate-pod"]


@pytest.mark.parametrize(
    ("mode", "moves"),
    [
        pytest.param("auto", True, id="detected-connector-loads-elsewhere"),
        pytest.param("off", False, id="gpu-only-cost-keeps-the-holder"),
    ],
)
async def test_a_busy_holder_loses_its_prefix_to_an_idle_pod_that_can_load_it(mode, moves):
    settings = fast_settings()
    settings.shared_tier.mode = mode
    async with start_cluster(2, settings) as cluster:
        holder = await _pod(cluster, PROMPT)
        gateway = cluster.gateway
        await wait_until(lambda: any(p.stats.external_queries > 0 for p in gateway.pods))
        assert gateway.shared_use.active is (mode == "auto")
        busy = cluster.engine_at(holder)
        # 8 decodes x 32 prefill tokens: more than loading the prompt (about 500 tokens x 0.1), less than computing it.
        busy.running = 8
        await wait_until(lambda: gateway.pods.get(holder).stats.running == 8)

        again = await _pod(cluster, PROMPT)

    assert (again != holder) is moves


async def test_the_gateway_exports_what_its_belief_predicted_and_the_learned_ratio():
    async with start_cluster(2) as cluster:
        await _pod(cluster, PROMPT)
        await wait_until(lambda: cluster.gateway.shared_use.active)
        pod = await _pod(cluster, PROMPT + " Second request.")
        async with await cluster.http.get(cluster.url + "/metrics") as r:
            text = await r.text()

    assert f'kvgate_shared_tier_predicted_tokens_total{{feed="decisions",pod="{pod}"}}' in text
    assert "kvgate_load_cost_ratio 0.1" in text
