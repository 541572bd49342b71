"""The live page in a real headless Chromium: it renders cleanly, shows what /metrics says, and keeps updating."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from router.decisions import decision
from tests.loopback.conftest import Cluster, fast_settings, start_cluster, wait_until
from tests.support.browser import launch

PROMPTS = ["You are a helpful assistant. " * 20 + f"Question {i}: what is {i} + {i}?" for i in range(3)]


def samples(text: str, name: str, label: str) -> dict[str, float]:
    """Values of the series `name` of an exposition, by the value of `label`."""
    return {s.labels[label]: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


async def send(cluster: Cluster, rounds: int) -> None:
    for i in range(rounds):
        for user, prompt in zip(("alice", "bob", "alice"), PROMPTS):
            response = await cluster.post(
                "/v1/completions", {"model": "tiny-llama", "prompt": prompt + str(i % 2), "max_tokens": 3},
                headers={"x-user-id": user},
            )
            assert response.status == 200
            await response.read()


async def settled(cluster: Cluster) -> str:
    """/metrics once the gateway has scraped every engine's latest counters."""
    await wait_until(
        lambda: all(cluster.gateway.pods.get(e.url).stats.prefix_queries == e.prefix.queries for e in cluster.engines)
    )
    return await (await cluster.http.get(cluster.url + "/metrics")).text()


async def cell_values(page, table: str, key: str, field: str) -> dict[str, float]:
    return await page.eval_on_selector_all(
        f"#{table} tbody tr",
        f"""rows => Object.fromEntries(rows.map(r => [r.dataset.{key},
            Number(r.querySelector('[data-field="{field}"]').dataset.value)]))""",
    )


async def wait_for_page(page, expected: dict[str, float], table: str, key: str, field: str, timeout: float = 15.0) -> None:
    """Wait until the page's column `field` shows `expected` (rows the exposition has no series for show 0)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        shown = await cell_values(page, table, key, field)
        if shown and shown == {row: expected.get(row, 0.0) for row in shown} and set(expected) <= set(shown):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{table}.{field}: page shows {shown}, /metrics says {expected}")
        await asyncio.sleep(0.1)


async def test_live_page_matches_metrics_and_keeps_updating():
    async with start_cluster(2, fast_settings()) as cluster, launch() as browser:
        await send(cluster, 2)
        metrics = await settled(cluster)
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(cluster.url + "/dashboard")
        await page.wait_for_selector("#pods tbody tr")

        hits = samples(metrics, "kvgate_engine_prefix_cache_hits_total", "pod")
        assert sum(hits.values()) > 0  # repeated prompts hit the engines' prefix caches
        await wait_for_page(page, hits, "pods", "pod", "prefix_hits")
        await wait_for_page(page, samples(metrics, "kvgate_engine_prefix_cache_queries_total", "pod"), "pods", "pod", "prefix_queries")
        await wait_for_page(page, samples(metrics, "kvgate_predicted_prefix_hit_tokens_total", "pod"), "pods", "pod", "predicted_tokens")
        await wait_for_page(page, samples(metrics, "kvgate_user_service_tokens_total", "user"), "users", "user", "served_tokens")
        decisions = await page.locator("#decisions .decision").count()
        assert decisions == 6
        newest = await page.locator("#decisions .decision").first.get_attribute("data-pod")
        assert newest == decision(cluster.gateway.router.decisions[-1]).pod

        # It keeps updating: more traffic shows up without a reload.
        before = int(await page.get_attribute("#status", "data-samples"))
        await send(cluster, 1)
        metrics = await settled(cluster)
        await wait_for_page(page, samples(metrics, "kvgate_engine_prefix_cache_hits_total", "pod"), "pods", "pod", "prefix_hits")
        assert await page.locator("#decisions .decision").count() == 9
        # Traffic while the page watched: the charts draw the hit rate and the tokens from cache.
        await page.wait_for_selector("#chart-hit path.series", state="attached", timeout=15_000)
        await page.wait_for_selector("#chart-saved path.series", state="attached", timeout=15_000)
        after = int(await page.get_attribute("#status", "data-samples"))
        assert after > before
        assert not errors, errors
