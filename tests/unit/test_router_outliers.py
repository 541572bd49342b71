"""Outlier detection on tables: verdicts in, ejections and backoffs out, on a fake clock.

Each case is a script of steps on pods named a, b, c, ...:
`a:ok`, `a:overloaded`, `a:broken` (a verdict), `+5` (five seconds pass),
`a:probe` (a good health probe); then the pods expected ejected, with the
seconds left of each ejection, and the seconds of backoff left per pod.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from router.errors import NoCapacity, UpstreamOverloaded, UpstreamTimeout, UpstreamUnavailable
from router.outliers import Outliers, Verdict, verdict_of
from router.pods import PodId, PodSet
from router.settings import OutlierSettings

SETTINGS = OutlierSettings(
    consecutive_failures=3,
    base_ejection_s=10.0,
    max_ejection_s=25.0,
    max_ejection_share=0.5,
    overload_backoff_s=0.5,
    max_overload_backoff_s=4.0,
)
B3 = ["a:broken"] * 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(script: list[str], pods: int = 2) -> tuple[Outliers, Clock, CollectorRegistry]:
    clock = Clock()
    table = PodSet(f"http://{chr(ord('a') + i)}" for i in range(pods))
    registry = CollectorRegistry()
    outliers = Outliers(table, SETTINGS, registry, clock)
    for step in script:
        if step.startswith("+"):
            clock.now += float(step[1:])
            continue
        name, action = step.split(":")
        pod = table.get(PodId(f"http://{name}"))
        assert pod is not None
        if action == "probe":
            outliers.probe_ok(pod)
        else:
            outliers.report(pod, Verdict(action))
    return outliers, clock, registry


@pytest.mark.parametrize(
    ("script", "pods", "ejected"),
    [
        pytest.param(["a:broken"] * 2, 2, {}, id="two-failures-are-not-enough"),
        pytest.param(B3, 2, {"a": 10.0}, id="three-in-a-row-eject-for-the-base-time"),
        pytest.param(["a:broken", "a:broken", "a:ok", "a:broken", "a:broken"], 2, {}, id="a-success-resets-the-streak"),
        pytest.param(["a:broken", "a:broken", "a:overloaded", "a:broken"], 2, {"a": 10.0}, id="overload-neither-resets-nor-counts"),
        pytest.param(["a:overloaded"] * 20, 2, {}, id="overload-never-ejects"),
        pytest.param(B3, 1, {}, id="the-only-pod-is-never-ejected"),
        pytest.param(B3 + ["b:broken"] * 3, 2, {"a": 10.0}, id="never-the-whole-fleet"),
        pytest.param(B3 + ["b:broken"] * 3, 4, {"a": 10.0, "b": 10.0}, id="half-of-four"),
        pytest.param(B3 + ["b:broken"] * 3 + ["c:broken"] * 3, 4, {"a": 10.0, "b": 10.0}, id="not-more-than-half-of-four"),
        pytest.param(B3 + ["b:broken"] * 3, 3, {"a": 10.0}, id="one-of-three"),
        pytest.param(B3 + ["+5", "a:probe"], 2, {"a": 5.0}, id="a-probe-before-the-time-does-not-readmit"),
        pytest.param(B3 + ["+10", "a:probe"], 2, {}, id="a-probe-after-the-time-readmits"),
        pytest.param(B3 + ["+30"], 2, {"a": -20.0}, id="no-readmission-without-a-probe"),
        pytest.param(B3 + ["+10", "a:probe"] + B3, 2, {"a": 20.0}, id="second-ejection-lasts-twice-as-long"),
        pytest.param(B3 + ["+10", "a:probe"] + B3 + ["+20", "a:probe"] + B3, 2, {"a": 25.0}, id="capped-at-max"),
        pytest.param(B3 + ["+10", "a:probe", "+10", "a:ok"] + B3, 2, {"a": 10.0}, id="a-calm-period-forgives-one-ejection"),
        pytest.param(B3 + ["+10", "a:probe", "+5", "a:ok"] + B3, 2, {"a": 20.0}, id="a-short-calm-forgives-nothing"),
        pytest.param(B3 + ["+10", "a:probe"] + ["b:broken"] * 3, 2, {"b": 10.0}, id="a-readmitted-pod-frees-its-share"),
    ],
)
def test_ejections(script, pods, ejected):
    outliers, clock, _ = run(script, pods)

    got = {pod.id.removeprefix("http://"): outliers.ejected_until(pod) - clock.now for pod in outliers.pods if pod.ejected}
    assert got == pytest.approx(ejected, abs=1e-9)


@pytest.mark.parametrize(
    ("script", "backoff"),
    [
        pytest.param(["a:overloaded"], 0.5, id="first"),
        pytest.param(["a:overloaded"] * 3, 2.0, id="doubles"),
        pytest.param(["a:overloaded"] * 10, 4.0, id="capped"),
        pytest.param(["a:overloaded"] * 3 + ["a:ok", "a:overloaded"], 0.5, id="a-success-resets"),
        pytest.param(["a:overloaded", "+0.3"], 0.2, id="runs-out"),
        pytest.param(["a:broken"], 0.0, id="broken-is-no-backoff"),
    ],
)
def test_overload_backoff(script, backoff):
    outliers, clock, _ = run(script)

    pod = outliers.pods.get(PodId("http://a"))
    assert pod is not None and not pod.ejected
    assert max(pod.backoff_until - clock.now, 0.0) == pytest.approx(backoff, abs=1e-9)


def test_metrics_count_ejections_refusals_and_verdicts():
    outliers, _, registry = run(B3 + ["b:broken"] * 3 + ["b:overloaded"])

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("kvgate_pod_ejections_total", pod="http://a") == 1
    assert value("kvgate_pod_ejections_refused_total", pod="http://b") == 1
    assert value("kvgate_pod_verdicts_total", pod="http://b", verdict="broken") == 3
    assert value("kvgate_pod_verdicts_total", pod="http://b", verdict="overloaded") == 1
    assert value("kvgate_pod_ejected", pod="http://a") == 1
    assert value("kvgate_pod_backing_off", pod="http://b") == 1


def test_the_last_pod_that_can_serve_is_not_ejected():
    clock = Clock()
    table = PodSet(["http://a", "http://b", "http://c"])
    outliers = Outliers(table, SETTINGS, CollectorRegistry(), clock)
    for name in ("http://b", "http://c"):
        down = table.get(PodId(name))
        assert down is not None
        down.healthy = False  # taken out by its health probes
    pod = table.get(PodId("http://a"))
    assert pod is not None

    for _ in range(5):
        outliers.report(pod, Verdict.BROKEN)

    assert not pod.ejected


def test_a_forgotten_pod_starts_afresh():
    outliers, clock, _ = run(B3 + ["+10", "a:probe"])
    pod = outliers.pods.get(PodId("http://a"))
    assert pod is not None
    outliers.forget(pod.id)

    for _ in range(3):
        outliers.report(pod, Verdict.BROKEN)

    assert outliers.ejected_until(pod) == pytest.approx(clock.now + 10.0)


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        pytest.param(UpstreamOverloaded("busy"), Verdict.OVERLOADED, id="overloaded"),
        pytest.param(UpstreamUnavailable("gone"), Verdict.BROKEN, id="unavailable"),
        pytest.param(UpstreamTimeout("slow"), Verdict.BROKEN, id="timeout"),
        pytest.param(NoCapacity("none"), Verdict.BROKEN, id="other-upstream"),
    ],
)
def test_verdict_of_an_error(error, verdict):
    assert verdict_of(error) is verdict
