"""Runs on several engine sets: their order over repeats, medians with spreads, prefill counters, ratios to SGLang."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest

from kvgate.bench.aggregate import rows
from kvgate.bench.comparison import markdown_lines, ratios
from kvgate.bench.engine_sets import parse_engine_sets, row_label, schedule
from kvgate.bench.fleet import EngineCounters, parse_counters
from kvgate.bench.report import markdown
from kvgate.bench.runner import RunOutcome
from kvgate.bench.stats import spread
from kvgate.bench.summary import summarize

from .test_bench_report import META, _results
from .test_bench_summary import DELTAS, TOKENS, TRACE, WORKLOAD


def _flat(blocks) -> list[tuple[int, str, int]]:
    return [(b.repeat, b.engine_set, router) for b in blocks for router in b.order]


def test_every_router_runs_on_every_set_once_per_repeat():
    order = _flat(schedule(3, ["plain", "shared"], 4))

    assert Counter((s, r) for _, s, r in order) == {(s, r): 4 for s in ("plain", "shared") for r in range(3)}
    for repeat in range(4):
        assert sorted((s, r) for rep, s, r in order if rep == repeat) == sorted(
            (s, r) for s in ("plain", "shared") for r in range(3)
        )


def test_each_repeat_starts_one_set_and_one_router_further():
    blocks = schedule(2, ["plain", "shared"], 3)

    assert [(b.engine_set, b.order) for b in blocks] == [
        ("plain", (0, 1)), ("shared", (0, 1)),
        ("shared", (1, 0)), ("plain", (1, 0)),
        ("plain", (0, 1)), ("shared", (0, 1)),
    ]  # fmt: skip
    firsts = Counter(b.order[0] for b in schedule(3, ["plain"], 3))
    assert firsts == {0: 1, 1: 1, 2: 1}  # no router always first


def test_engine_set_names_are_checked_and_labelled():
    assert parse_engine_sets(["shared", "plain", "shared"]) == ["shared", "plain"]
    with pytest.raises(ValueError, match="unknown"):
        parse_engine_sets(["gpu"])
    with pytest.raises(ValueError):
        parse_engine_sets([])
    assert row_label("sglang:cache_aware", "plain") == "sglang:cache_aware"
    assert row_label("sglang:cache_aware", "shared") == "sglang:cache_aware@shared"


def test_spread_is_the_median_and_range_without_nan():
    found = spread([300.0, 100.0, math.nan, 200.0])

    assert found is not None
    assert (found.median, found.low, found.high, found.count) == (200.0, 100.0, 300.0, 3)
    assert spread([1.0, 3.0]).median == 2.0  # type: ignore[union-attr]
    assert spread([]) is None and spread([math.nan]) is None


def test_prefill_computed_and_shared_cache_hits_are_read_from_the_engine():
    text = "\n".join(
        [
            '# TYPE vllm:prompt_tokens_by_source_total counter',
            'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 300.0',
            'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 512.0',
            'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 256.0',
            'vllm:external_prefix_cache_queries_total{engine="0",model_name="m"} 768.0',
            'vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 256.0',
        ]
    )

    counters = parse_counters(text)

    assert counters.prefill_computed == 300.0
    assert (counters.external_queries, counters.external_hits) == (768.0, 256.0)


def test_a_restarted_engine_keeps_what_its_earlier_life_counted():
    earlier = EngineCounters(prompt_tokens=1000, prefill_computed=600, running=3)
    now = EngineCounters(prompt_tokens=200, prefill_computed=50, running=1)
    before_run = EngineCounters(prompt_tokens=400, prefill_computed=300)

    across = now.plus(earlier).since(before_run)

    assert (across.prompt_tokens, across.prefill_computed, across.running) == (800, 350, 1)


def _two_sets():
    base = _results()
    plain = base.runs[0]
    summary = plain.summary
    assert summary is not None
    runs = []
    for repeat, (ttft, prefill) in enumerate([(300.0, 900.0), (100.0, 700.0), (200.0, 800.0)]):
        for router, engine_set, factor in (
            ("kvgate:kv-aware", "plain", 1.0),
            ("kvgate:kv-aware", "shared", 0.5),
            ("sglang:cache_aware", "plain", 2.0),
            ("sglang:cache_aware", "shared", 1.0),
        ):
            runs.append(
                RunOutcome(
                    router=router,
                    workload="skewed-users",
                    started_at="t",
                    summary=replace(
                        summary,
                        ttft_ms_p50=ttft * factor,
                        ttft_ms_p90=2 * ttft * factor,
                        prefill_tokens_computed=prefill * factor,
                    ),
                    repeat=repeat,
                    engine_set=engine_set,
                    restart_s=20.0 + repeat,
                )
            )
    return replace(
        base,
        runs=tuple(runs),
        repeats=3,
        routers=("kvgate:kv-aware", "sglang:cache_aware"),
        engine_sets=("plain", "shared"),
    )


def test_rows_are_per_router_and_engine_set_with_spreads():
    table = {row.label: row for row in rows(_two_sets(), "skewed-users")}

    assert list(table) == [
        "kvgate:kv-aware", "sglang:cache_aware", "kvgate:kv-aware@shared", "sglang:cache_aware@shared",
    ]  # fmt: skip
    shared = table["kvgate:kv-aware@shared"]
    assert shared.engine_set == "shared" and shared.repeats_ok == 3
    assert shared.summary.ttft_ms_p50 == 100.0  # median of 150, 50, 100
    p90 = shared.spreads["ttft_ms_p90"]
    assert (p90.median, p90.low, p90.high) == (200.0, 100.0, 300.0)
    assert shared.spreads["prefill_tokens_computed"].median == 400.0
    assert shared.restart_s == 21.0


def test_kvgate_is_set_against_sglang_on_each_set():
    results = _two_sets()

    found = {(r.row, r.reference): r for r in ratios(results, "skewed-users")}

    assert set(found) == {
        (ours, theirs)
        for ours in ("kvgate:kv-aware", "kvgate:kv-aware@shared")
        for theirs in ("sglang:cache_aware", "sglang:cache_aware@shared")
    }
    on_shared = found[("kvgate:kv-aware@shared", "sglang:cache_aware@shared")]
    assert (on_shared.ttft_p50, on_shared.ttft_p90, on_shared.prefill) == pytest.approx((0.5, 0.5, 0.5))
    assert found[("kvgate:kv-aware@shared", "sglang:cache_aware")].ttft_p50 == pytest.approx(0.25)
    lines = "\n".join(markdown_lines(results))
    assert "| skewed-users | kvgate:kv-aware@shared | sglang:cache_aware@shared | 0.50 | 0.50 | 0.50 | 1.00 |" in lines
    assert "| 0.50 (0.50-0.50), 3 of 3 |" in lines  # kvgate@shared's p50 half SGLang@shared's in every repeat
    alone = _results()
    alone = replace(alone, runs=tuple(r for r in alone.runs if r.router != "sglang:cache_aware"))
    assert markdown_lines(alone) == []  # no reference row: nothing to set against


def _one_set(kvgate: list[tuple[float, float] | None], sglang: list[tuple[float, float] | None]):
    """Repeats of kvgate and SGLang on plain engines: (TTFT p50, hit rate) per repeat, None for a failed run."""
    base = _results()
    summary = base.runs[0].summary
    runs = []
    for router, figures in (("kvgate:kv-aware", kvgate), ("sglang:cache_aware", sglang)):
        for repeat, found in enumerate(figures):
            changed = None if found is None else replace(summary, ttft_ms_p50=found[0], hit_rate=found[1])
            runs.append(
                RunOutcome(
                    router=router, workload="skewed-users", started_at="t", summary=changed,
                    error=None if found else "boom", repeat=repeat,
                )
            )  # fmt: skip
    return replace(base, runs=tuple(runs), repeats=len(kvgate))


def test_ratios_are_also_taken_repeat_by_repeat():
    # Medians are level (200 ms each), but kvgate was faster in two repeats of three.
    results = _one_set([(100.0, 0.5), (300.0, 0.4), (200.0, 0.6)], [(200.0, 0.4), (150.0, 0.5), (250.0, 0.5)])

    (ratio,) = ratios(results, "skewed-users")

    assert ratio.ttft_p50 == pytest.approx(1.0)
    p50 = ratio.per_repeat["ttft_ms_p50"]
    assert (p50.median, p50.low, p50.high, p50.better, p50.pairs) == pytest.approx((0.8, 0.5, 2.0, 2, 3))
    hits = ratio.per_repeat["hit_rate"]
    assert (hits.median, hits.better, hits.pairs) == pytest.approx((1.2, 2, 3))  # higher is better here
    lines = "\n".join(markdown_lines(results))
    assert "| 0.80 (0.50-2.00), 2 of 3 |" in lines and "| 1.20 (0.80-1.25), 2 of 3 |" in lines


def test_a_repeat_one_router_failed_is_not_paired():
    results = _one_set([(100.0, 0.5), None, (300.0, 0.5)], [(200.0, 0.5), (100.0, 0.5), None])

    (ratio,) = ratios(results, "skewed-users")

    p50 = ratio.per_repeat["ttft_ms_p50"]
    assert (p50.median, p50.better, p50.pairs) == pytest.approx((0.5, 1, 1))
    assert "| 0.50, 1 repeat |" in "\n".join(markdown_lines(results))


def test_markdown_shows_engine_sets_ranges_and_prefill():
    text = markdown(_two_sets(), META)

    assert "| kvgate:kv-aware@shared |" in text and "| sglang:cache_aware@shared |" in text
    assert "200.0 (100-300)" in text  # TTFT p90 median with its range
    assert "400 (350-450)" in text  # prefill computed, kvgate on shared engines
    assert "## kvgate against sglang:cache_aware" in text


def test_one_summary_counts_prefill_against_the_least_the_trace_allows():
    deltas = [replace(d, prefill_computed=7.0, external_hits=4.0) for d in DELTAS]

    summary = summarize(WORKLOAD, TRACE, deltas, tokens_of=lambda r: TOKENS[r.id], block_size=4)

    assert summary.prefill_tokens_computed == 14.0 and summary.external_hit_tokens == 8.0
    assert summary.min_prefill_tokens == summary.bound_prompt_tokens - summary.bound_hit_tokens


def test_engine_args_from_the_command_line_reach_every_engine(tmp_path):
    from kvgate.bench.cli import build_parser
    from kvgate.bench.config import quick
    from kvgate.bench.fleet import EngineFleet
    from kvgate.bench.routers import parse_routers
    from kvgate.bench.runner import fleet_spec

    args = build_parser().parse_args(["--engine-arg=--long-prefill-token-threshold=256", "--engine-arg=--x=1"])
    spec = fleet_spec(
        quick(), parse_routers(["sglang:cache_aware"]), model_dir=tmp_path, log_dir=tmp_path,
        engine_args=args.engine_args,
    )  # fmt: skip

    engines = EngineFleet(spec).engines
    assert len(engines) == quick().engines
    for engine in engines:
        assert engine.spec.argv()[-2:] == ["--long-prefill-token-threshold=256", "--x=1"]
    assert build_parser().parse_args([]).engine_args == []


@pytest.mark.parametrize(
    ("routers", "kvgate_kv_events", "published"),
    [
        (["sglang:cache_aware"], True, False),
        (["kvgate:kv-aware", "sglang:cache_aware"], True, True),
        (["kvgate:kv-aware"], False, False),
        (["kvgate:kv-aware", "vllm-router:kv_aware"], False, True),
    ],
)
def test_engines_publish_kv_events_only_for_a_router_that_reads_them(tmp_path, routers, kvgate_kv_events, published):
    from kvgate.bench.config import quick
    from kvgate.bench.routers import parse_routers
    from kvgate.bench.runner import fleet_spec

    spec = fleet_spec(
        quick(), parse_routers(routers), model_dir=tmp_path, log_dir=tmp_path, kvgate_kv_events=kvgate_kv_events
    )

    assert spec.kv_events is published
    assert spec.engine_args == ()
