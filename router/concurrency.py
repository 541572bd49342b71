"""Adaptive concurrency limits: how many requests the gateway lets each pod run at once.

A pod's engine can only run so many requests at a time (its KV cache and its
compute decide how many); requests sent beyond that queue inside the engine,
first-in first-out, where nobody can reorder them. This module keeps one
limit per pod that follows what the engine reports, so that the surplus of
users served more than others waits at the gateway instead, in the admission
queue ordered by the VTC counters (`router.admission`), and so that the
queue stays empty while the engines keep up. (Requests of users level with
the others are held only to the cap: `router.routing.Router.held_to_limit`.)

The controller is additive-increase, multiplicative-decrease, with the
engine's own figures as the congestion signal (as TCP Vegas reads queueing
from delay, and Netflix's concurrency-limits from latency). Once per fresh
scrape of the pod (`router.monitor`), it reads a `Reading` and:

- shrinks the limit when the pod answers 429 or 503 (`overloaded`), and
  when the engine holds requests waiting (to what the engine runs, plus what
  it may keep waiting; by the backoff factor if the limit is already there),
  when its KV cache is nearly full, or when the time to first token per
  token of prefill work has risen to `ttft_tolerance` times its floor (by
  the ratio, at most halving);
  but not while the pod still has more in flight than its limit: the
  engine's figures then show the load from before the last cut (one cut per
  round trip, as AIMD limiters do);
- grows it by one when the limit was reached in the interval and none of
  that holds (a limit nobody reaches is not grown: it would tell nothing);
- puts it back to the cap when the pod had nothing to do for a whole
  interval, so that an idle fleet never holds a request.

A request's TTFT is read per token of the prefill work it waited for: seconds
over its uncached prompt tokens, plus those the gateway had already queued on
the pod when it sent it (every replica's), plus `OVERHEAD_TOKENS` (what
scheduling, one step and sampling cost, in tokens' worth). What rises then is
the time the engine takes per token of work, which is what congestion is: its
steps slowed by more requests than it runs well at once. Two readings were
tried first and misread the mixed workload (`kvgate bench`: cache hits among
long new prompts) as congestion:

- The raw TTFT mostly measures the prompt: it varies tenfold between quiet
  intervals, and the limits fell to 1 to 3 on engines that had nothing
  waiting.
- Per token of the request's own work, a hit that shared the engine's step
  with a long prompt queued just before it read as ten times slower. The
  limits were cut on 56 of 57 evaluations that moved them, all for TTFT, and
  requests waited 60 ms each on average at the gateway, while the same run
  with fixed limits served 5% more requests per second: the engines had
  room, the router had chosen that queue (its cost prices it), and holding
  the next requests back did not shorten it.

The figure of an evaluation is the median of the gateway's own observations
on the pod (streams only: a whole answer's first byte is its last), or, with
fewer than `_MIN_SAMPLES` of them, the engine's TTFT sum over the tokens it
computed (plus the overhead per request) from its counters, once it has
answered at least `_MIN_SAMPLES` requests. Until one of them has that many,
observations carry over to the next scrape instead of deciding on one or two
(on CPU engines one step can take a second, longer than a scrape interval).
The floor is the lowest figure seen, drifting up slowly so that a slower mix
for ever does not read as congestion for ever.

Callers: `router.routing.Router` reads `limit`, counts dispatches and first
tokens, and has `update` called by the monitor after each scrape. Not here:
the queue (`router.admission`) or who is dispatched (`router.routing`).
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.pods import Pod, PodId
from router.settings import AdmissionSettings

#: Gateway TTFT observations an interval needs before their median is trusted over the engine's mean.
_MIN_SAMPLES = 3
#: Observations kept per interval (the median of a bounded sample is as good).
_MAX_SAMPLES = 256
#: Largest cut of one evaluation for a risen TTFT: at most halve the limit.
_MAX_TTFT_CUT = 0.5
#: A request's fixed cost before its first token (scheduling, a step, sampling), in prompt tokens'
#: worth: a cache hit computes a few tokens, yet waits about this. On the CPU engines here a full
#: hit's TTFT is that of computing about 200 tokens; a block is the order of it.
OVERHEAD_TOKENS = 128


class Step(enum.Enum):
    """What one evaluation did to a pod's limit."""

    GROW = "grow"
    HOLD = "hold"
    SHRINK = "shrink"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class Reading:
    """What one evaluation of a pod's limit looks at.

    Attributes:
        waiting: requests the engine reports waiting (not yet running).
        running: requests the engine reports running.
        kv_usage: fraction of the engine's KV cache in use.
        ttft_per_token_s: typical time to first token per token of prefill work over the
            interval (see the module docstring), None when nothing started.
        peak_in_flight: most requests in flight on the pod (every replica's) during the interval.
    """

    waiting: int
    running: int
    kv_usage: float
    ttft_per_token_s: float | None
    peak_in_flight: int


@dataclass(frozen=True, slots=True)
class Decision:
    """A pod's new limit, what changed it and why."""

    limit: int
    step: Step
    why: str


@dataclass(slots=True)
class PodLimit:
    """One pod's adaptive limit and the floor of its TTFT per token of work it is judged against.

    Args:
        settings: the admission settings (cap, floor, thresholds).
    """

    settings: AdmissionSettings
    limit: int = 0
    ttft_floor_s: float | None = None
    """The lowest interval TTFT per token of work seen (drifting up), in seconds per token."""

    def __post_init__(self) -> None:
        if not self.limit:
            self.limit = self.settings.max_inflight_per_pod

    def update(self, reading: Reading) -> Decision:
        """Evaluate the limit once against `reading` (see the module docstring). Mutates `limit`."""
        s = self.settings
        cap, least = s.max_inflight_per_pod, min(s.min_inflight_per_pod, s.max_inflight_per_pod)
        ttft = reading.ttft_per_token_s
        floor = self.ttft_floor_s
        if ttft is not None and ttft > 0:
            drifted = None if floor is None else floor * (1.0 + s.ttft_floor_drift)
            self.ttft_floor_s = ttft if drifted is None else min(drifted, ttft)
        old = self.limit
        if reading.peak_in_flight == 0 and reading.running == 0 and reading.waiting == 0:
            self.limit = cap
            return Decision(cap, Step.RESET if cap != old else Step.HOLD, "idle")
        congested = reading.waiting > s.engine_waiting_allowed or reading.kv_usage >= s.kv_usage_high
        if (congested or (ttft is not None and floor is not None and ttft > s.ttft_tolerance * floor)) and (
            reading.peak_in_flight > old
        ):
            # The pod still has more in flight than its limit lets in: what the engine
            # reports is the load from before the last cut, not yet a verdict on this limit.
            return Decision(old, Step.HOLD, "draining to the limit")
        if reading.waiting > s.engine_waiting_allowed:
            runs = reading.running + s.engine_waiting_allowed
            target = runs if runs < old else int(old * s.limit_backoff)
            return self.shrink(max(target, least), f"engine holds {reading.waiting} waiting")
        if reading.kv_usage >= s.kv_usage_high:
            return self.shrink(int(old * s.limit_backoff), f"KV cache {reading.kv_usage:.0%} full")
        if ttft is not None and floor is not None and ttft > s.ttft_tolerance * floor:
            cut = max(_MAX_TTFT_CUT, s.ttft_tolerance * floor / ttft)
            return self.shrink(
                int(old * cut), f"TTFT {ttft * 1e6:.0f} µs/token > {s.ttft_tolerance:g} x floor {floor * 1e6:.0f} µs/token"
            )
        if reading.peak_in_flight >= old and old < cap:
            self.limit = old + 1
            return Decision(self.limit, Step.GROW, "limit reached, engine keeps up")
        return Decision(old, Step.HOLD, "engine keeps up")

    def shrink(self, target: int, why: str) -> Decision:
        """Lower the limit to `target`, by at least one, never below `min_inflight_per_pod`. Mutates `limit`."""
        s = self.settings
        least = min(s.min_inflight_per_pod, s.max_inflight_per_pod)
        new = max(least, min(target, self.limit - 1))
        step = Step.SHRINK if new < self.limit else Step.HOLD
        self.limit = new
        return Decision(new, step, why)


@dataclass(slots=True)
class _Interval:
    """What the gateway saw of one pod since its last evaluation."""

    peak: int = 0
    ttfts: list[float] = field(default_factory=list)
    """The gateway's TTFT observations, per token of work, since the last figure was taken."""
    engine_ttft: tuple[float, float, float] | None = None
    """The engine's TTFT histogram sum and count and its computed prompt tokens when the last figure was taken."""


class ConcurrencyLimits:
    """The per-pod limits of one router: fixed at the cap, or adaptive.

    Args:
        settings: the admission settings; `adaptive` chooses.
        registry: where `kvgate_pod_concurrency_limit{pod}` is exported (none: not exported).
        pods: the pods to export the limit of.
    """

    def __init__(
        self,
        settings: AdmissionSettings,
        registry: CollectorRegistry | None = None,
        pods: Callable[[], Iterable[Pod]] = lambda: (),
    ) -> None:
        self.settings = settings
        self._limits: dict[PodId, PodLimit] = {}
        self._seen: dict[PodId, _Interval] = {}
        self.last: dict[PodId, Decision] = {}
        """Each pod's last decision (for the dashboard and logs)."""
        if registry is not None:
            registry.register(_LimitCollector(self, pods))

    def limit(self, pod: Pod) -> int:
        """Requests `pod` may have in flight (every replica's) before requests wait at the gateway."""
        if not self.settings.adaptive:
            return self.settings.max_inflight_per_pod
        state = self._limits.get(pod.id)
        return state.limit if state is not None else self.settings.max_inflight_per_pod

    def dispatched(self, pod: Pod) -> None:
        """A request was just counted on `pod`: note its in-flight peak."""
        seen = self._seen.get(pod.id)
        if seen is None:
            seen = self._seen[pod.id] = _Interval()
        seen.peak = max(seen.peak, pod.fleet_in_flight)

    def first_token(self, pod: Pod, seconds: float, work_tokens: float) -> None:
        """The gateway saw `pod` start answering a stream `seconds` after sending it a request that waited for
        `work_tokens` of prefill work (its own uncached tokens and those queued on the pod before it)."""
        seen = self._seen.get(pod.id)
        if seen is None:
            seen = self._seen[pod.id] = _Interval()
        if len(seen.ttfts) < _MAX_SAMPLES:
            seen.ttfts.append(seconds / (max(work_tokens, 0) + OVERHEAD_TOKENS))

    def overloaded(self, pod: Pod) -> None:
        """`pod` refused a request as overloaded (429/503): shrink its limit below what it had in flight."""
        if not self.settings.adaptive:
            return
        state = self._limits.get(pod.id)
        if state is None:
            state = self._limits[pod.id] = PodLimit(self.settings)
        target = min(int(state.limit * self.settings.limit_backoff), pod.fleet_in_flight - 1)
        self.last[pod.id] = state.shrink(target, "answered 429/503")

    def update(self, pod: Pod) -> Decision | None:
        """Evaluate `pod`'s limit on its freshly scraped figures and the interval's observations.

        Returns:
            The decision, or None when limits are fixed.
        """
        if not self.settings.adaptive:
            return None
        seen = self._seen.get(pod.id)
        if seen is None:
            seen = self._seen[pod.id] = _Interval()
        stats = pod.stats
        engine_ttft = (stats.ttft_sum, stats.ttft_count, stats.computed_tokens)
        ttft = None
        # Observations carry over until an evaluation has enough; a restarted engine's counters start again.
        decided = seen.engine_ttft is None or engine_ttft[1] < seen.engine_ttft[1]
        if len(seen.ttfts) >= _MIN_SAMPLES:
            ttft = statistics.median(seen.ttfts)
            decided = True
        elif seen.engine_ttft is not None and engine_ttft[1] - seen.engine_ttft[1] >= _MIN_SAMPLES:
            seconds, requests, computed = (now - then for now, then in zip(engine_ttft, seen.engine_ttft))
            work = computed + requests * OVERHEAD_TOKENS
            ttft = seconds / work if work > 0 else None
            decided = True
        reading = Reading(
            waiting=stats.waiting,
            running=stats.running,
            kv_usage=stats.kv_usage,
            ttft_per_token_s=ttft if ttft is None or ttft >= 0 else None,  # a restarted engine's counters went back
            peak_in_flight=max(seen.peak, pod.fleet_in_flight),
        )
        state = self._limits.get(pod.id)
        if state is None:
            state = self._limits[pod.id] = PodLimit(self.settings)
        decision = state.update(reading)
        self.last[pod.id] = decision
        seen.peak = pod.fleet_in_flight
        if decided:
            seen.ttfts.clear()
            seen.engine_ttft = engine_ttft
        return decision

    def forget(self, pod_id: PodId) -> None:
        """The pod left the table: drop its limit."""
        self._limits.pop(pod_id, None)
        self._seen.pop(pod_id, None)
        self.last.pop(pod_id, None)


class _LimitCollector(Collector):
    def __init__(self, limits: ConcurrencyLimits, pods: Callable[[], Iterable[Pod]]) -> None:
        self._limits = limits
        self._pods = pods

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        gauge = GaugeMetricFamily(
            "kvgate_pod_concurrency_limit",
            "Requests the gateway lets the pod have in flight before requests wait in the admission queue.",
            labels=["pod"],
        )
        for pod in self._pods():
            gauge.add_metric([pod.id], float(self._limits.limit(pod)))
        yield gauge
