"""The monitor: keeps each pod's health, models and engine figures current.

Per pod it runs one task that probes `/health` (and `/v1/models` until the
pod's models are known) every `health_interval_s`, and scrapes `/metrics`
every `scrape.interval_s`. A pod is taken out after `unhealthy_after`
consecutive failures (probes, or connection failures the proxy reports) and
put back on its first good probe. A pod taken out, removed, or whose engine
restarted (its prefix-cache counters went backwards) loses its entries in the
prefix index, since its KV cache is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from router.index import PrefixIndex
from router.pods import Pod, PodEndpoint, PodId, PodSet, lora_adapters
from router.scrape import parse_engine_metrics
from router.settings import DiscoverySettings, ScrapeSettings

log = logging.getLogger(__name__)


class Monitor:
    """Health, models and figures of every pod.

    Args:
        pods: the pod table to keep current.
        index: the prefix index, told when a pod's cache is gone.
        session: HTTP client for probes.
        discovery: probe settings.
        scrape: scrape settings.
        on_pod_up: called when a pod starts taking traffic, so that requests
            waiting for a slot can have its.
    """

    def __init__(
        self,
        pods: PodSet,
        index: PrefixIndex,
        session: aiohttp.ClientSession,
        discovery: DiscoverySettings,
        scrape: ScrapeSettings,
        on_pod_up: Callable[[], None] = lambda: None,
    ) -> None:
        self.pods = pods
        self._on_pod_up = on_pod_up
        self.index = index
        self._session = session
        self._discovery = discovery
        self._scrape = scrape
        self._tasks: dict[PodId, asyncio.Task] = {}
        self.block_size: int | None = None

    def set_pods(self, endpoints: frozenset[PodEndpoint]) -> None:
        """Make the pod table match `endpoints`: start watching new pods, forget gone ones.

        Pods are keyed by `PodEndpoint.id`, so a new pod at an old address
        (another UID) replaces the old one and starts with an empty index entry.
        """
        wanted = {endpoint.id: endpoint for endpoint in endpoints}
        for pod in list(self.pods):
            if pod.id not in wanted:
                self._forget(pod)
        for pod_id, endpoint in wanted.items():
            pod = self.pods.get(pod_id)
            if pod is None:
                pod = self.pods.add(endpoint.url, pod_id=pod_id)
                pod.healthy = False  # until the first good probe
                self._tasks[pod.id] = asyncio.create_task(self._watch(pod), name=f"monitor {pod_id}")

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def report_failure(self, pod: Pod) -> None:
        """The proxy could not reach `pod`: count it like a failed probe."""
        pod.failures += 1
        if pod.healthy and pod.failures >= self._discovery.unhealthy_after:
            self._mark_down(pod, "requests to it failed")

    def report_success(self, pod: Pod) -> None:
        pod.failures = 0

    async def _watch(self, pod: Pod) -> None:
        next_health = 0.0
        while True:
            now = time.monotonic()
            if now >= next_health:
                await self._probe(pod)
                next_health = now + self._discovery.health_interval_s
            if pod.healthy:
                await self._scrape_metrics(pod)
            await asyncio.sleep(min(self._scrape.interval_s, self._discovery.health_interval_s))

    async def _get(self, pod: Pod, path: str) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=self._discovery.probe_timeout_s)
        return await self._session.get(pod.url + path, timeout=timeout)

    async def _probe(self, pod: Pod) -> None:
        try:
            async with await self._get(pod, "/health") as response:
                ok = response.status == 200
            if ok and not pod.models:
                async with await self._get(pod, "/v1/models") as response:
                    if response.status == 200:
                        payload = await response.json()
                        data = payload.get("data") or []
                        pod.models = frozenset(m["id"] for m in data if isinstance(m, dict) and "id" in m)
                        pod.adapters = lora_adapters(data)
                        lens = [m.get("max_model_len") for m in data if isinstance(m, dict)]
                        pod.max_model_len = next((n for n in lens if isinstance(n, int)), None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            ok = False
            log.debug("probe of %s failed: %s", pod.url, exc)
        if ok:
            pod.failures = 0
            if not pod.healthy:
                pod.healthy = True
                pod.changed_at = time.monotonic()
                log.info("pod %s is up", pod.url)
                self._on_pod_up()
        else:
            pod.failures += 1
            if pod.healthy and pod.failures >= self._discovery.unhealthy_after:
                self._mark_down(pod, "health probes failed")

    async def _scrape_metrics(self, pod: Pod) -> None:
        try:
            async with await self._get(pod, "/metrics") as response:
                if response.status != 200:
                    return
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("scrape of %s failed: %s", pod.url, exc)
            return
        stats = parse_engine_metrics(text)
        if stats.prefix_queries < pod.stats.prefix_queries:
            dropped = self.index.drop_pod(pod.id)
            log.info("pod %s restarted its engine; forgot %d cached blocks", pod.url, dropped)
        pod.stats = stats
        if stats.num_gpu_blocks is not None and stats.num_gpu_blocks != self.index.capacity(pod.id):
            self.index.set_capacity(pod.id, stats.num_gpu_blocks)
            pod.touch()  # its occupancy changed
        if stats.block_size is not None:
            self.block_size = stats.block_size

    def _mark_down(self, pod: Pod, why: str) -> None:
        pod.healthy = False
        pod.changed_at = time.monotonic()
        dropped = self.index.drop_pod(pod.id)
        pod.touch()  # its occupancy changed
        log.warning("pod %s is down (%s); forgot %d cached blocks", pod.url, why, dropped)

    def _forget(self, pod: Pod) -> None:
        task = self._tasks.pop(pod.id, None)
        if task is not None:
            task.cancel()
        self.index.drop_pod(pod.id)
        self.pods.remove(pod.id)
