"""Outlier detection: what the answers to requests say about a pod, between health probes.

The gateway reports the fate of every attempt on a pod (`Outliers.report`)
as a `Verdict`:

- `OK`: the pod answered. Resets its failure and overload streaks.
- `OVERLOADED`: it answered 429 or 503 while its engine is otherwise well.
  The pod is avoided for a backoff that doubles per such answer in a row
  (`Pod.backoff_until`; `router.routing` skips it while another pod can
  serve) and keeps everything else: its place, its health, its cache.
- `BROKEN`: it could not be reached, broke off, timed out or answered
  another 5xx. After `consecutive_failures` in a row the pod is ejected
  (`Pod.ejected`) for `base_ejection_s` times the number of times it has
  been ejected, capped at `max_ejection_s`, unless that would eject more
  than `max_ejection_share` of the pods (never all of them). When the time
  is up the monitor's next good health probe re-admits it (`probe_ok`).

No verdict forgets a pod's cached prefixes: an overloaded or briefly broken
pod still holds its KV cache. The prefix index forgets a pod only when it is
removed, its engine restarted, or its KV events say so (`router.monitor`,
`router.kv_events`). This module does no I/O; time comes from `clock`.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.errors import GatewayError, UpstreamOverloaded
from router.metrics import drop_series
from router.pods import Pod, PodId, PodSet
from router.settings import OutlierSettings

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    OK = "ok"
    OVERLOADED = "overloaded"
    BROKEN = "broken"


def verdict_of(error: GatewayError) -> Verdict:
    """The verdict an upstream error passes on its pod."""
    return Verdict.OVERLOADED if isinstance(error, UpstreamOverloaded) else Verdict.BROKEN


@dataclass(slots=True)
class _Record:
    failures: int = 0
    """Broken verdicts in a row."""
    overloads: int = 0
    """Overloaded verdicts in a row."""
    times_ejected: int = 0
    """Ejections not yet forgiven; the next ejection lasts this plus one times the base."""
    ejected_until: float = 0.0
    calm_since: float = 0.0
    """When the pod was last re-admitted or forgiven an ejection."""


class _StateCollector(Collector):
    def __init__(self, outliers: "Outliers") -> None:
        self._outliers = outliers

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        ejected = GaugeMetricFamily("kvgate_pod_ejected", "1 while outlier detection keeps the pod out of rotation.", labels=["pod"])
        backing_off = GaugeMetricFamily(
            "kvgate_pod_backing_off", "1 while the pod is avoided as overloaded (it answered 429/503).", labels=["pod"]
        )
        now = self._outliers.clock()
        for pod in self._outliers.pods:
            ejected.add_metric([pod.id], 1.0 if pod.ejected else 0.0)
            backing_off.add_metric([pod.id], 1.0 if pod.backoff_until > now else 0.0)
        yield from (ejected, backing_off)


class Outliers:
    """Per-pod failure streaks, ejections and overload backoffs.

    Args:
        pods: the pod table; `Pod.ejected` and `Pod.backoff_until` are set here.
        settings: thresholds and times.
        registry: where the metrics are registered.
        clock: monotonic seconds (a fake in tests).
    """

    def __init__(
        self,
        pods: PodSet,
        settings: OutlierSettings,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pods = pods
        self.settings = settings
        self.clock = clock
        self._records: dict[PodId, _Record] = {}
        self.ejections = Counter("kvgate_pod_ejections", "Times a pod was ejected by outlier detection.", ["pod"], registry=registry)
        self.ejections_refused = Counter(
            "kvgate_pod_ejections_refused",
            "Ejections not done because max_ejection_share of the pods was already ejected.",
            ["pod"],
            registry=registry,
        )
        self.verdicts = Counter(
            "kvgate_pod_verdicts", "Failed attempts on a pod, by verdict (overloaded or broken).", ["pod", "verdict"], registry=registry
        )
        registry.register(_StateCollector(self))

    def _record(self, pod: Pod) -> _Record:
        record = self._records.get(pod.id)
        if record is None:
            record = self._records[pod.id] = _Record()
        return record

    def report(self, pod: Pod, verdict: Verdict) -> None:
        """Take the verdict of one attempt on `pod`.

        Side effects: may set `pod.backoff_until`, eject the pod, count metrics.
        """
        record = self._record(pod)
        now = self.clock()
        if verdict is Verdict.OK:
            record.failures = record.overloads = 0
            pod.backoff_until = 0.0
            # Envoy's decay: each base period a re-admitted pod stays well forgives one ejection.
            if record.times_ejected and not pod.ejected and now - record.calm_since >= self.settings.base_ejection_s:
                record.times_ejected -= 1
                record.calm_since = now
            return
        self.verdicts.labels(pod.id, verdict.value).inc()
        if verdict is Verdict.OVERLOADED:
            record.overloads += 1
            backoff = self.settings.overload_backoff_s * 2.0 ** min(record.overloads - 1, 30)
            pod.backoff_until = now + min(backoff, self.settings.max_overload_backoff_s)
            return
        record.failures += 1
        if record.failures >= self.settings.consecutive_failures and not pod.ejected:
            self._eject(pod, record, now)

    def _may_eject(self, candidate: Pod) -> bool:
        total = len(self.pods)
        if total < 2:
            return False
        share = min(max(self.settings.max_ejection_share, 0.0), 1.0)
        allowed = min(max(math.floor(total * share), 1), total - 1)
        if sum(1 for pod in self.pods if pod.ejected) >= allowed:
            return False
        # Never eject the last pod that can serve (the others may be down for their health probes).
        return any(pod.healthy and not pod.ejected for pod in self.pods if pod is not candidate)

    def _eject(self, pod: Pod, record: _Record, now: float) -> None:
        if not self._may_eject(pod):
            self.ejections_refused.labels(pod.id).inc()
            log.warning("pod %s keeps failing but is not ejected: max_ejection_share of the pods is out", pod.url)
            return
        record.times_ejected += 1
        seconds = min(self.settings.base_ejection_s * record.times_ejected, self.settings.max_ejection_s)
        record.ejected_until = now + seconds
        record.failures = 0
        pod.ejected = True
        self.ejections.labels(pod.id).inc()
        log.warning("pod %s ejected for %.1fs after %d failed requests in a row", pod.url, seconds, self.settings.consecutive_failures)

    def probe_ok(self, pod: Pod) -> bool:
        """A health probe of `pod` succeeded: re-admit it if its ejection time is over.

        Returns:
            True if the pod was re-admitted now.
        """
        record = self._records.get(pod.id)
        if not pod.ejected or record is None or self.clock() < record.ejected_until:
            return False
        pod.ejected = False
        record.calm_since = self.clock()
        log.info("pod %s re-admitted after its ejection", pod.url)
        return True

    def ejected_until(self, pod: Pod) -> float | None:
        """When `pod`'s ejection ends (monotonic seconds), or None if it is not ejected."""
        record = self._records.get(pod.id)
        return record.ejected_until if pod.ejected and record is not None else None

    def forget(self, pod_id: PodId) -> None:
        """The pod is gone from the table: drop its record and its series."""
        self._records.pop(pod_id, None)
        drop_series(self.ejections, ("pod",), "pod", pod_id)
        drop_series(self.ejections_refused, ("pod",), "pod", pod_id)
        drop_series(self.verdicts, ("pod", "verdict"), "pod", pod_id)
