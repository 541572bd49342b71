"""The router records each decision as it made it: candidates, costs, matched blocks, load before."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from router.concurrency import PodLimit
from router.decisions import DECISIONS_KEPT, DecisionLog, decision, summarize_log
from router.fairness import VirtualTokenCounters
from router.index import PrefixIndex
from router.metrics import GatewayMetrics
from router.pods import PodId, PodSet, UserId
from router.policies import PolicyBook, PolicyDeps, RouteRequest
from router.routing import Router
from router.settings import AdmissionSettings, RoutingSettings, Settings
from router.startup import check_settings
from router.errors import StartupError


def make_router(n: int = 3) -> tuple[Router, PolicyBook, list[PodId]]:
    pods = PodSet(f"http://10.0.0.{i}:8000" for i in range(n))
    counters = VirtualTokenCounters()
    router = Router(pods, PrefixIndex(1000), counters, AdmissionSettings(), GatewayMetrics(), random.Random(1))
    return router, PolicyBook(PolicyDeps(RoutingSettings(), counters, random.Random(1))), [p.id for p in pods]


def request(matched: dict[PodId, int]) -> RouteRequest:
    return RouteRequest(user=UserId("alice"), model="m", prompt_tokens=300, block_size=128, matched_blocks=matched)


def test_record_shows_every_candidate_cheapest_first_with_load_before_the_decision():
    router, book, ids = make_router()
    router.pods.get(ids[0]).in_flight = 5  # busy: least-request prices it highest
    lease = router.try_acquire(request({ids[1]: 2, ids[2]: 1}), book.get("least-request"), "least-request")
    assert lease is not None
    d = decision(router.decisions[-1])
    assert d.pod == lease.pod.id and d.policy == "least-request" and d.user == "alice"
    assert [c.cost for c in d.candidates] == sorted(c.cost for c in d.candidates)
    assert d.candidates[-1].pod == ids[0] and d.candidates[-1].in_flight == 5
    chosen = next(c for c in d.candidates if c.pod == d.pod)
    assert chosen.in_flight == 0  # before the decision, though the pod now has one in flight
    assert lease.pod.in_flight == 1
    assert d.matched_tokens == min(chosen.matched_blocks * 128, 300)
    assert {c.pod: c.matched_blocks for c in d.candidates} == {ids[0]: 0, ids[1]: 2, ids[2]: 1}


def test_only_the_most_recent_decisions_are_kept():
    router, book, _ = make_router()
    for _ in range(DECISIONS_KEPT + 10):
        lease = router.try_acquire(request({}), book.get("round-robin"), "round-robin")
        assert lease is not None
        lease.release()
    assert len(router.decisions) == DECISIONS_KEPT


def test_the_log_has_every_decision_and_every_wait_for_a_pod_at_its_limit(tmp_path):
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, flush_s=0.0)
    pods = PodSet(["http://a", "http://b"])
    counters = VirtualTokenCounters()
    settings = AdmissionSettings(max_inflight_per_pod=64, min_inflight_per_pod=1)
    router = Router(pods, PrefixIndex(100), counters, settings, GatewayMetrics(), random.Random(1), decision_log=log)
    router.limits._limits["http://a"] = PodLimit(settings, limit=1)
    policy = PolicyBook(PolicyDeps(RoutingSettings(), counters, random.Random(1))).get("kv-aware")
    counters.arrive(UserId("light"))  # heavy is served more than a user with a request running: held to the limit
    counters.charge(UserId("heavy"), input_tokens=10_000)
    held = RouteRequest(user=UserId("heavy"), model="m", prompt_tokens=1100, block_size=128, matched_blocks={PodId("http://a"): 8})

    first = router.try_acquire(held, policy, "kv-aware")
    assert first is not None and first.pod.id == "http://a"
    assert router.try_acquire(held, policy, "kv-aware") is None  # a is at its limit and still cheapest

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["pod"], line["waits"]) for line in lines] == [("http://a", False), ("http://a", True)]
    assert all(line["user"] == "heavy" and line["policy"] == "kv-aware" for line in lines)
    placed, waited = lines
    assert {c["pod"]: c["matched_blocks"] for c in placed["candidates"]} == {"http://a": 8, "http://b": 0}
    assert [c["cost"] for c in placed["candidates"]] == sorted(c["cost"] for c in placed["candidates"])
    assert placed["matched_tokens"] == 1024
    assert {c["pod"]: c["in_flight"] for c in waited["candidates"]}["http://a"] == 1
    assert log.written == 2 and len(router.decisions) == 1  # the dashboard keeps only placements
    first.release()
    log.close()


def test_the_log_is_buffered_until_its_interval_and_written_on_close(tmp_path):
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, flush_s=3600.0)
    router, book, ids = make_router()
    router.decision_log = log
    lease = router.try_acquire(request({ids[1]: 2}), book.get("kv-aware"), "kv-aware")
    assert lease is not None
    assert path.read_text() == ""  # still in the buffer
    log.close()
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["pod"] == lease.pod.id


def test_a_decision_log_that_cannot_be_written_stops_the_start(tmp_path):
    settings = Settings()
    settings.routing = replace(settings.routing, decision_log=tmp_path / "missing" / "decisions.jsonl")
    with pytest.raises(StartupError, match="--decision-log"):
        check_settings(settings)
    settings.routing = replace(settings.routing, decision_log=tmp_path / "decisions.jsonl")
    check_settings(settings)


def _line(pod: str, matched: dict[str, int], *, user: str = "u", waits: bool = False) -> str:
    candidates = [{"pod": p, "cost": 1.0, "matched_blocks": m, "in_flight": 0} for p, m in matched.items()]
    return json.dumps({"user": user, "pod": pod, "waits": waits, "candidates": candidates})


def test_a_log_summary_tells_prompts_at_their_prefix_from_those_sent_away_and_those_with_none():
    lines = [
        _line("a", {"a": 8, "b": 0}, user="g1"),  # at its prefix
        _line("b", {"a": 8, "b": 2}, user="g1"),  # sent away: 6 blocks left behind
        _line("a", {"a": 0, "b": 0}, user="new"),  # nothing cached
        _line("a", {"a": 8, "b": 0}, user="g1", waits=True),  # waited for a, placed in the next line
        _line("a", {"a": 8, "b": 8}, user="g1"),  # a tie at the longest match
        "",
    ]
    summary = summarize_log(lines)
    assert (summary.placed, summary.waits) == (4, 1)
    assert (summary.at_longest, summary.sent_away, summary.nothing_cached) == (2, 1, 1)
    assert summary.blocks_given_up == 6
    assert summary.pods_per_user == pytest.approx((2 + 1) / 2)  # g1 on a and b, new on a
    with pytest.raises(ValueError, match="line 2"):
        summarize_log([lines[0], "{}"])


def test_a_log_the_router_wrote_summarises(tmp_path):
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    router, book, ids = make_router()
    router.decision_log = log
    for _ in range(3):
        lease = router.try_acquire(request({ids[1]: 2}), book.get("kv-aware"), "kv-aware")
        assert lease is not None and lease.pod.id == ids[1]
        lease.release()
    log.close()
    summary = summarize_log(path.read_text().splitlines())
    assert (summary.placed, summary.at_longest, summary.pods_per_user) == (3, 3, 1.0)
