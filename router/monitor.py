"""The monitor: keeps each pod's health, models and engine figures current.

Per pod it runs one task that probes `/health` (and `/v1/models` until the
pod's models are known) every `health_interval_s`, and scrapes `/metrics`
every `scrape.interval_s` (only the series it reads, where the engine can
serve them alone: `router.scrape.FILTERED_METRICS_PATH`), after which the router re-evaluates the pod's
concurrency limit (`router.concurrency`). A pod is taken out after
`unhealthy_after` consecutive failed probes and put back on its first good
probe; an ejected
pod (`router.outliers`) is re-admitted by its first good probe once its
ejection time is over.

Whatever a pod answers, the task goes on: answers of the wrong shape (an
empty list for models, invalid UTF-8 or garbage in /metrics) are read as
failed probes or skipped scrapes by the total parsers of `router.scrape`, and
any exception that still escapes one step is caught by a `Guard` (logged once
per kind, counted in `kvgate_background_errors_total`) before the next step.

Taking a pod out does not forget its cached prefixes: a pod that stops
answering for a while keeps its KV cache. The prefix index forgets a pod only
when it is removed or its engine restarted (its process start time changed,
or its prefix-cache counters went backwards); its KV events may also say so
(`router.kv_events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable

import aiohttp

from router.index import PrefixIndex
from router.outliers import Outliers
from router.pods import EngineStats, Pod, PodEndpoint, PodId, PodSet
from router.scrape import FILTERED_METRICS_PATH, SIGN_OF_VLLM, decode_text, parse_engine_metrics, parse_models
from router.settings import DiscoverySettings, ScrapeSettings
from router.supervise import Guard, supervise

log = logging.getLogger(__name__)

#: Largest /v1/models answer read, in bytes.
MAX_MODELS_BYTES = 1 << 20
#: Largest /metrics answer read, in bytes (vLLM's are a few hundred KiB with many histograms).
MAX_METRICS_BYTES = 32 << 20


class BadAnswer(ValueError):
    """A probe or scrape answer the monitor cannot use (logged and counted by the guard, never raised out)."""


class AnswerTooLarge(BadAnswer):
    """A probe or scrape answer longer than the monitor reads."""


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if (response.content_length or 0) > limit:
        raise AnswerTooLarge(f"{response.content_length} bytes, more than {limit}")
    body = bytearray()
    while chunk := await response.content.read(65536):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(f"more than {limit} bytes")
    return bytes(body)


def restarted(before: EngineStats, now: EngineStats) -> bool:
    """Whether the engine restarted (and lost its KV cache) between two scrapes.

    Its process start time changed (where exported; a second of slack for the
    clock it is computed from), or its prefix-cache counters went backwards.
    """
    if before.started_at is not None and now.started_at is not None and abs(now.started_at - before.started_at) > 1.0:
        return True
    return now.prefix_queries < before.prefix_queries


class Monitor:
    """Health, models and figures of every pod.

    Args:
        pods: the pod table to keep current.
        index: the prefix index, told when a pod's cache is gone.
        session: HTTP client for probes.
        discovery: probe settings.
        scrape: scrape settings.
        outliers: outlier detection, whose ejected pods good probes re-admit.
        guard: catches and counts what escapes a probe or scrape.
        on_pod_up: called when a pod starts taking traffic, so that requests
            waiting for a slot can have its.
        on_scrape: called with the pod, its previous and its new figures
            after each scrape (what learns from the engines' counters).
        on_scraped: called with a pod whose engine figures were just scraped
            (the router re-evaluates its concurrency limit).
        on_pod_gone: called with the id of a pod removed from the table.
    """

    def __init__(
        self,
        pods: PodSet,
        index: PrefixIndex,
        session: aiohttp.ClientSession,
        discovery: DiscoverySettings,
        scrape: ScrapeSettings,
        outliers: Outliers,
        guard: Guard,
        on_pod_up: Callable[[], None] = lambda: None,
        on_scrape: Callable[[Pod, EngineStats, EngineStats], None] | None = None,
        on_scraped: Callable[[Pod], object] = lambda pod: None,
        on_pod_gone: Callable[[PodId], object] = lambda pod_id: None,
    ) -> None:
        self.pods = pods
        self._on_pod_up = on_pod_up
        self._on_scrape = on_scrape
        self._on_scraped = on_scraped
        self._on_pod_gone = on_pod_gone
        self.index = index
        self._session = session
        self._discovery = discovery
        self._scrape = scrape
        self._outliers = outliers
        self._guard = guard
        self._tasks: dict[PodId, asyncio.Task] = {}
        self._full_page: set[PodId] = set()
        """Pods whose /metrics/ answered no restricted vLLM page: scraped at /metrics."""
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
                # The loop guards each step; the supervisor restarts it should anything else escape.
                watch = supervise("monitor", functools.partial(self._watch, pod), self._guard)
                self._tasks[pod.id] = asyncio.create_task(watch, name=f"monitor {pod_id}")

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, pod: Pod) -> None:
        next_health = 0.0
        while True:
            now = time.monotonic()
            if now >= next_health:
                ok = await self._guard.run("probe", self._probe(pod), pod.url)
                if ok is None:  # the probe itself failed: count it like a failed probe
                    self._probed(pod, False)
                next_health = now + self._discovery.health_interval_s
            if pod.healthy:
                await self._guard.run("scrape", self._scrape_metrics(pod), pod.url)
            await asyncio.sleep(min(self._scrape.interval_s, self._discovery.health_interval_s))

    async def _get(self, pod: Pod, path: str, limit: int) -> tuple[int, bytes]:
        """GET `path` of `pod`: its status, and its body (at most `limit` bytes, none if 0) when 200."""
        timeout = aiohttp.ClientTimeout(total=self._discovery.probe_timeout_s)
        async with self._session.get(pod.url + path, timeout=timeout) as response:
            if response.status != 200 or not limit:
                return response.status, b""  # the body is not read; closing the response drops it
            return response.status, await _read_bounded(response, limit)

    async def _probe(self, pod: Pod) -> bool:
        """Probe `pod` once (health, and models until known) and act on the answer. Returns whether it was good."""
        try:
            status, _ = await self._get(pod, "/health", 0)
            ok = status == 200
            if ok and not pod.models:
                status, body = await self._get(pod, "/v1/models", MAX_MODELS_BYTES)
                models = parse_models(body) if status == 200 else None
                if models is None:
                    ok = False
                    self._guard.record("probe", BadAnswer(f"/v1/models answered {status} without a usable model list"), pod.url)
                else:
                    pod.models, pod.max_model_len, pod.adapters = models.names, models.max_model_len, models.adapters
        except (aiohttp.ClientError, asyncio.TimeoutError, AnswerTooLarge) as exc:
            ok = False
            log.debug("probe of %s failed: %s", pod.url, exc)
        self._probed(pod, ok)
        return ok

    def _probed(self, pod: Pod, ok: bool) -> None:
        if ok:
            pod.failures = 0
            back = self._outliers.probe_ok(pod)
            if not pod.healthy:
                pod.healthy = back = True
                pod.changed_at = time.monotonic()
                log.info("pod %s is up", pod.url)
            if back:
                self._on_pod_up()
        else:
            pod.failures += 1
            if pod.healthy and pod.failures >= self._discovery.unhealthy_after:
                self._mark_down(pod, "health probes failed")

    async def _read_metrics(self, pod: Pod) -> str | None:
        """The pod's metrics page: only the series the router reads where the pod can say so (vLLM), else all."""
        restricted = pod.id not in self._full_page
        if restricted:
            status, body = await self._get(pod, FILTERED_METRICS_PATH, MAX_METRICS_BYTES)
            text = decode_text(body) if status == 200 else ""
            if SIGN_OF_VLLM in text:
                return text
        status, body = await self._get(pod, "/metrics", MAX_METRICS_BYTES)
        text = decode_text(body) if status == 200 else None
        if restricted and text is not None and SIGN_OF_VLLM in text:
            # A good full page beside no restricted one: this engine cannot serve it (not a passing fault).
            self._full_page.add(pod.id)
            log.info("pod %s serves no restricted metrics page; scraping /metrics", pod.url)
        return text

    async def _scrape_metrics(self, pod: Pod) -> None:
        ours = pod.fleet_in_flight
        try:
            text = await self._read_metrics(pod)
        except (aiohttp.ClientError, asyncio.TimeoutError, AnswerTooLarge) as exc:
            log.debug("scrape of %s failed: %s", pod.url, exc)
            return
        if text is None:
            return
        stats = parse_engine_metrics(text, previous=pod.stats)
        # The engine counted at some moment of the scrape: of our counts then, the higher, so others are never overcounted.
        stats.gateway_in_flight = max(ours, pod.fleet_in_flight)
        if restarted(pod.stats, stats):
            dropped = self.index.drop_pod(pod.id)
            log.info("pod %s restarted its engine; forgot %d cached blocks", pod.url, dropped)
        before, pod.stats = pod.stats, stats
        if self._on_scrape is not None:
            self._on_scrape(pod, before, stats)
        if stats.num_gpu_blocks is not None and stats.num_gpu_blocks != self.index.capacity(pod.id):
            self.index.set_capacity(pod.id, stats.num_gpu_blocks)
            pod.touch()  # its occupancy changed
        if stats.block_size is not None:
            self.block_size = stats.block_size
        self._on_scraped(pod)

    def _mark_down(self, pod: Pod, why: str) -> None:
        pod.healthy = False
        pod.changed_at = time.monotonic()
        log.warning("pod %s is down (%s); its cached prefixes are kept until it shows a restart", pod.url, why)

    def _forget(self, pod: Pod) -> None:
        task = self._tasks.pop(pod.id, None)
        if task is not None:
            task.cancel()
        self._outliers.forget(pod.id)
        self._full_page.discard(pod.id)
        self.index.remove_pod(pod.id)
        self.pods.remove(pod.id)
        self._on_pod_gone(pod.id)
