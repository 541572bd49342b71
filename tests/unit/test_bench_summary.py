"""One run's figures from a hand-made trace, and the engines' counters from their /metrics text."""

from __future__ import annotations

import pytest

from kvgate.bench.fleet import EngineCounters, parse_counters, total
from kvgate.bench.load import RequestRecord, RunTrace
from kvgate.bench.summary import summarize
from kvgate.bench.workloads import BenchRequest, Session, Workload

BLOCK = 4


def _request(rid: str, user: str) -> BenchRequest:
    return BenchRequest(id=rid, user=user, messages=(("user", rid),), max_tokens=4)


def _record(rid: str, user: str, sent: float, first: float | None, done: float, *, status: int = 200,
            prompt: int | None = 10, completion: int | None = 4, error: str | None = None) -> RequestRecord:  # fmt: skip
    return RequestRecord(
        request_id=rid, session_id=rid, user=user, sent_s=sent, first_token_s=first, done_s=done,
        status=status, error=error, prompt_tokens=prompt, completion_tokens=completion,
    )  # fmt: skip


TOKENS = {
    "h1": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    "h2": [1, 2, 3, 4, 5, 6, 7, 8, 20, 21],  # shares two blocks with h1
    "l1": [9, 9, 9, 9, 9, 9],
    "l2": [9, 9, 9, 9, 8, 8],  # shares one block with l1
    "h3": [1, 2, 3, 4],
}
REQUESTS = {rid: _request(rid, "heavy" if rid.startswith("h") else "light-00") for rid in TOKENS}
WORKLOAD = Workload(
    name="skewed-users",
    description="test",
    seed=0,
    sessions=(
        Session("heavy-c0", "heavy", (REQUESTS["h1"], REQUESTS["h2"], REQUESTS["h3"])),
        Session("light-c0", "light-00", (REQUESTS["l1"], REQUESTS["l2"])),
    ),
    clients=2,
    duration_s=10.0,
    heavy_users=("heavy",),
    light_users=("light-00",),
)
TRACE = RunTrace(
    records=(
        _record("h1", "heavy", 0.0, 0.1, 0.5),
        _record("l1", "light-00", 0.2, 0.4, 1.0, prompt=6),
        _record("h2", "heavy", 0.5, 0.8, 1.5),
        _record("l2", "light-00", 1.0, None, 1.2, status=503, prompt=None, completion=None, error="HTTP 503: busy"),
        _record("h3", "heavy", 9.5, 10.2, 10.5, prompt=4),  # finishes after the 10 s window
    ),
    wall_s=10.5,
)
DELTAS = [
    EngineCounters(prefix_queries=20, prefix_hits=8, requests=2, prompt_tokens=20),
    EngineCounters(prefix_queries=10, prefix_hits=0, requests=2, prompt_tokens=10, preemptions=1),
]


def test_summary_of_a_hand_made_run():
    s = summarize(WORKLOAD, TRACE, DELTAS, tokens_of=lambda r: TOKENS[r.id], block_size=BLOCK)

    assert (s.requests_sent, s.requests_ok, s.requests_failed) == (5, 4, 1)
    assert s.failure_samples == ("HTTP 503: busy",)
    assert s.hit_rate == pytest.approx(8 / 30)
    # Send order h1 l1 h2 l2 h3: h2 hits 8, l2 hits 4, h3 (one block, capped at 0 blocks) hits 0.
    assert (s.bound_hit_tokens, s.bound_prompt_tokens) == (12, 10 + 6 + 10 + 6 + 4)
    assert s.hit_rate_vs_bound == pytest.approx((8 / 30) / (12 / 36))
    # TTFT of the four successes: 100, 200, 300, 700 ms.
    assert s.ttft_ms_p50 == pytest.approx(250.0)
    # Latencies 500, 800, 1000, 1000 ms.
    assert (s.latency_ms_p50, s.latency_ms_p99) == pytest.approx((900.0, 1000.0))
    # Within the 10 s window: h1, l1, h2 (h3 ended at 10.5 s).
    assert s.throughput_rps == pytest.approx(3 / 10.0)
    assert s.output_tokens_per_s == pytest.approx(12 / 10.0)
    assert s.service_by_user == {"heavy": 2 * (10 + 2 * 4), "light-00": 6 + 2 * 4}
    assert s.light_share == pytest.approx(14 / 50)
    assert s.light_share_fair == pytest.approx(0.5)
    assert s.jain_index == pytest.approx(50**2 / (2 * (36**2 + 14**2)))
    # The largest request costs 10 + 2 x 4 = 18: floor = 1 x (50 - 36) / (2 x 50).
    assert s.light_share_vtc_floor == pytest.approx(14 / 100)
    assert s.preemptions == 1
    assert [e.requests for e in s.engines] == [2, 2]
    assert s.engines[0].hit_rate == pytest.approx(0.4)


def test_untimed_workload_counts_every_success_over_the_wall_time():
    untimed = Workload(name="w", description="", seed=0, sessions=WORKLOAD.sessions, clients=2)

    s = summarize(untimed, TRACE, DELTAS, tokens_of=lambda r: TOKENS[r.id], block_size=BLOCK)

    assert s.throughput_rps == pytest.approx(4 / 10.5)
    assert s.light_share is None and s.light_share_vtc_floor is None
    assert s.service_by_user["heavy"] == 2 * 18 + 4 + 8


METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny-llama"} 7177.0
vllm:prefix_cache_hits_total{engine="0",model_name="tiny-llama"} 4352.0
vllm:prefix_cache_hits_created{engine="0",model_name="tiny-llama"} 1.7952393023181698e+09
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 1.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny-llama"} 1.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny-llama"} 6.0
vllm:num_preemptions_total{engine="0",model_name="tiny-llama"} 0.0
vllm:prompt_tokens_total{engine="0",model_name="tiny-llama"} 7177.0
vllm:generation_tokens_total{engine="0",model_name="tiny-llama"} 96.0
process_cpu_seconds_total 7.96
"""


def test_counters_are_read_and_summed_over_labels():
    c = parse_counters(METRICS)

    assert (c.prefix_queries, c.prefix_hits) == (7177.0, 4352.0)
    assert c.requests == 7.0
    assert (c.running, c.waiting) == (2.0, 1.0)
    assert c.generation_tokens == 96.0
    assert c.hit_rate == pytest.approx(4352 / 7177)


def test_deltas_subtract_counters_but_keep_gauges():
    before = EngineCounters(prefix_queries=100, prefix_hits=10, running=5)
    after = EngineCounters(prefix_queries=250, prefix_hits=70, running=0)

    delta = after.since(before)

    assert (delta.prefix_queries, delta.prefix_hits, delta.running) == (150, 60, 0)
    assert total([delta, delta]).prefix_hits == 120
