"""The gateway's Prometheus metrics, all prefixed `kvgate_`, on a registry of its own.

Two views of cache hits live side by side: what the router predicted when it
routed (`kvgate_predicted_*`: prefix tokens the index believed were on the
chosen pod) and what the engines report (`kvgate_engine_*`, re-exported per
pod from each pod's scraped `vllm:prefix_cache_*` counters). A gap between
them means the index believes in blocks the engines no longer have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.fairness import VirtualTokenCounters
from router.pods import Pod

_DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1)
_TOKEN_BUCKETS = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def drop_series(metric: Counter | Gauge | Histogram, labels: tuple[str, ...], label: str, value: str) -> None:
    """Remove every child of `metric` (labelled `labels`) whose `label` is `value`: a pod that left
    must not keep its series for the life of the gateway (pods come and go under new names)."""
    at = labels.index(label)
    found = set()
    for family in metric.collect():
        for sample in family.samples:
            key = tuple(sample.labels.get(name, "") for name in labels)
            if key[at] == value:
                found.add(key)
    for key in found:
        metric.remove(*key)


class _EngineCollector(Collector):
    """Re-exports each pod's scraped figures at collection time."""

    def __init__(self, pods: Callable[[], Iterable[Pod]]) -> None:
        self._pods = pods

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        queries = CounterMetricFamily(
            "kvgate_engine_prefix_cache_queries", "Prompt tokens looked up in the pod's prefix cache (engine-reported).", labels=["pod"]
        )
        hits = CounterMetricFamily(
            "kvgate_engine_prefix_cache_hits", "Prompt tokens found in the pod's own prefix cache (engine-reported).", labels=["pod"]
        )
        ext_queries = CounterMetricFamily(
            "kvgate_engine_external_prefix_cache_queries", "Prompt tokens looked up in the shared KV cache (engine-reported).", labels=["pod"]
        )
        ext_hits = CounterMetricFamily(
            "kvgate_engine_external_prefix_cache_hits", "Prompt tokens loaded from the shared KV cache (engine-reported).", labels=["pod"]
        )
        running = GaugeMetricFamily("kvgate_engine_requests_running", "Requests running on the pod (engine-reported).", labels=["pod"])
        waiting = GaugeMetricFamily("kvgate_engine_requests_waiting", "Requests waiting on the pod (engine-reported).", labels=["pod"])
        kv = GaugeMetricFamily("kvgate_engine_kv_cache_usage", "Fraction of the pod's KV cache in use (engine-reported).", labels=["pod"])
        healthy = GaugeMetricFamily("kvgate_pod_healthy", "1 if the pod is taking traffic.", labels=["pod"])
        for pod in self._pods():
            s = pod.stats
            queries.add_metric([pod.id], s.prefix_queries)
            hits.add_metric([pod.id], s.prefix_hits)
            ext_queries.add_metric([pod.id], s.external_queries)
            ext_hits.add_metric([pod.id], s.external_hits)
            running.add_metric([pod.id], s.running)
            waiting.add_metric([pod.id], s.waiting)
            kv.add_metric([pod.id], s.kv_usage)
            healthy.add_metric([pod.id], 1.0 if pod.healthy else 0.0)
        yield from (queries, hits, ext_queries, ext_hits, running, waiting, kv, healthy)


class _UserCollector(Collector):
    """Per-user fairness figures, read from the VTC counters at collection time.

    NOTE: one series per user the gateway has seen, as many as the counters
    themselves keep; users come from API keys or the user header, so their
    number is the deployment's number of clients.
    """

    def __init__(self, counters: VirtualTokenCounters) -> None:
        self._counters = counters

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        virtual = GaugeMetricFamily(
            "kvgate_user_virtual_tokens", "The user's virtual token counter (VTC; lifted when idle).", labels=["user"]
        )
        served = CounterMetricFamily(
            "kvgate_user_service_tokens", "Weighted tokens the user has received (input plus weighted output).", labels=["user"]
        )
        for user, value in self._counters.snapshot().items():
            virtual.add_metric([user], value)
        for user, value in self._counters.served().items():
            served.add_metric([user], value)
        yield from (virtual, served)


class GatewayMetrics:
    """Every metric the gateway exports.

    Args:
        registry: where to register; a fresh one per gateway (no globals).
        pods: the pods to re-export engine figures for.
    """

    def __init__(self, registry: CollectorRegistry | None = None, pods: Callable[[], Iterable[Pod]] | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvgate_requests", "Requests answered, by pod, policy and HTTP status.", ["pod", "policy", "status"], registry=r
        )
        self.decision_seconds = Histogram(
            "kvgate_routing_decision_seconds", "Time to price the pods and pick one.", buckets=_DECISION_BUCKETS, registry=r
        )
        self.matched_tokens = Histogram(
            "kvgate_matched_prefix_tokens", "Prompt tokens the index believed cached on the chosen pod.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.predicted_hit_tokens = Counter(
            "kvgate_predicted_prefix_hit_tokens", "Prompt tokens predicted to hit the chosen pod's prefix cache.", ["pod"], registry=r
        )
        self.prompt_tokens = Counter("kvgate_prompt_tokens", "Prompt tokens routed.", ["pod"], registry=r)
        self.in_flight = Gauge("kvgate_pod_in_flight", "Requests the gateway has in flight on each pod.", ["pod"], registry=r)
        self.queue_length = Gauge("kvgate_admission_queue_length", "Requests waiting for a free slot.", registry=r)
        self.unkeyed_prompts = Counter(
            "kvgate_prompt_unkeyed",
            "Requests routed without a prefix match because the engine's prompt tokens cannot be known "
            "here (a chat template sent with the request, multimodal content, prompt embeddings, ...).",
            ["reason"],
            registry=r,
        )
        self.queue_limit = Gauge("kvgate_admission_queue_limit", "Requests the admission queue holds at most.", registry=r)
        self.admission_wait_seconds = Histogram(
            "kvgate_admission_wait_seconds", "Time requests that found every pod full spent in the admission queue.", registry=r
        )
        self.retries = Counter("kvgate_upstream_retries", "Requests re-sent to another pod after a failure.", ["pod"], registry=r)
        self.stream_errors = Counter(
            "kvgate_stream_errors", "Streams ended with an error event after the pod broke off.", ["pod"], registry=r
        )
        self.upstream_too_large = Counter(
            "kvgate_upstream_too_large", "Answers or stream events from a pod over the size limits.", ["pod"], registry=r
        )
        self.client_cutoffs = Counter(
            "kvgate_client_cutoffs",
            "Client connections or requests cut off: connection_limit, header_timeout, body_timeout.",
            ["reason"],
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "kvgate_time_to_first_byte_seconds", "From arrival to the pod's first response byte.", ["policy"], registry=r
        )
        if pods is not None:
            r.register(_EngineCollector(pods))
        # Labelled children, looked up once: `labels()` costs microseconds a call.
        self._per_pod: dict[str, tuple[Counter, Counter, Gauge]] = {}
        self._outcomes: dict[tuple[str, str, str], Counter] = {}
        self._ttft: dict[str, Histogram] = {}

    def forget_pod(self, pod: str) -> None:
        """`pod` left the table: drop its series."""
        self._per_pod.pop(pod, None)
        self._outcomes = {key: child for key, child in self._outcomes.items() if key[0] != pod}
        drop_series(self.requests, ("pod", "policy", "status"), "pod", pod)
        for metric in (self.predicted_hit_tokens, self.prompt_tokens, self.in_flight, self.retries, self.stream_errors, self.upstream_too_large):
            drop_series(metric, ("pod",), "pod", pod)

    def watch_users(self, counters: VirtualTokenCounters) -> None:
        """Export per-user VTC counters and service received (call once)."""
        self.registry.register(_UserCollector(counters))

    def _pod(self, pod: str) -> tuple[Counter, Counter, Gauge]:
        children = self._per_pod.get(pod)
        if children is None:
            children = self._per_pod[pod] = (
                self.predicted_hit_tokens.labels(pod),
                self.prompt_tokens.labels(pod),
                self.in_flight.labels(pod),
            )
        return children

    def record_decision(
        self, *, pod: str, policy: str, seconds: float, matched_tokens: int, prompt_tokens: int, in_flight: int
    ) -> None:
        predicted, prompt, gauge = self._pod(pod)
        self.decision_seconds.observe(seconds)
        self.matched_tokens.observe(matched_tokens)
        predicted.inc(matched_tokens)
        prompt.inc(prompt_tokens)
        gauge.set(in_flight)

    def record_release(self, pod: str, in_flight: int) -> None:
        self._pod(pod)[2].set(in_flight)

    def record_outcome(self, pod: str, policy: str, status: int) -> None:
        key = (pod, policy, str(status))
        child = self._outcomes.get(key)
        if child is None:
            if len(self._outcomes) >= 4096:  # policies come from headers: bound the cache
                self._outcomes.clear()
            child = self._outcomes[key] = self.requests.labels(*key)
        child.inc()

    def record_first_byte(self, policy: str, seconds: float) -> None:
        child = self._ttft.get(policy)
        if child is None:
            child = self._ttft[policy] = self.ttft_seconds.labels(policy)
        child.observe(seconds)
