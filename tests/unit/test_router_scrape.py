"""Reading a vLLM engine's /metrics text into the figures the router uses."""

from __future__ import annotations

import pytest

from router.pods import EngineStats
from router.scrape import FILTERED_METRICS_PATH, SERIES, ModelList, decode_text, parse_engine_metrics, parse_models

# Shaped like vLLM's own exposition: HELP/TYPE lines, labels in any order, a
# data-parallel pod with two engines, `_created` samples next to counters and
# histograms whose `_bucket`/`_sum`/`_count` series must not be read.
TWO_ENGINES = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny llama"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny llama"} 4.0
vllm:num_requests_waiting{engine="1",model_name="tiny llama"} 0.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny llama"} 1200.0
vllm:prefix_cache_queries_total{engine="1",model_name="tiny llama"} 800.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="tiny llama"} 1.7327e+09
vllm:prefix_cache_queries_created{engine="1",model_name="tiny llama"} 1.7327e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny llama"} 640.0
vllm:prefix_cache_hits_total{engine="1",model_name="tiny llama"} 160.0
# HELP vllm:external_prefix_cache_queries_total External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.
# TYPE vllm:external_prefix_cache_queries_total counter
vllm:external_prefix_cache_queries_total{engine="0",model_name="tiny llama"} 560.0
vllm:external_prefix_cache_queries_total{engine="1",model_name="tiny llama"} 640.0
# HELP vllm:external_prefix_cache_hits_total External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.
# TYPE vllm:external_prefix_cache_hits_total counter
vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny llama"} 128.0
vllm:external_prefix_cache_hits_total{engine="1",model_name="tiny llama"} 256.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny llama"} 17.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny llama"} 17.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny llama"} 3.25
# HELP vllm:request_prompt_tokens Number of prefill tokens processed.
# TYPE vllm:request_prompt_tokens histogram
vllm:request_prompt_tokens_bucket{engine="1",le="+Inf",model_name="tiny llama"} 9.0
vllm:request_prompt_tokens_sum{engine="1",model_name="tiny llama"} 2000.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="2048",num_gpu_blocks_override="None",prefix_caching_hash_algo="sha256",swap_space="4"} 1.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
process_open_fds 42.0
"""


def test_two_engines_are_summed_and_histograms_ignored():
    """Histograms are skipped but for the TTFT's sum and count (the adaptive limits' signal)."""
    stats = parse_engine_metrics(TWO_ENGINES, now=100.0)

    assert (stats.ttft_sum, stats.ttft_count) == (pytest.approx(3.25), 17.0)

    assert (stats.running, stats.waiting) == (5, 4)
    assert stats.prefix_queries == pytest.approx(2000.0, abs=1e-9)
    assert stats.prefix_hits == pytest.approx(800.0, abs=1e-9)
    assert stats.external_queries == pytest.approx(1200.0, abs=1e-9)
    assert stats.external_hits == pytest.approx(384.0, abs=1e-9)
    assert (stats.block_size, stats.num_gpu_blocks) == (16, 2048)
    assert stats.scraped_at == 100.0


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.375', 0.375, id="kv-cache-usage"),
        pytest.param('vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25', 0.25, id="older-vllm-gpu-cache-usage"),
        pytest.param("vllm:kv_cache_usage_perc 0.5", 0.5, id="no-labels"),
        pytest.param('vllm:kv_cache_usage_perc{model_name="org/My Model {v2}"} 0.125', 0.125, id="spaces-and-braces-in-label"),
        pytest.param('vllm:kv_cache_usage_perc{engine="0"} 6.25e-01', 0.625, id="exponent"),
    ],
)
def test_kv_usage_is_read(line, expected):
    text = f"# TYPE vllm:kv_cache_usage_perc gauge\n{line}\n"

    assert parse_engine_metrics(text).kv_usage == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "block_size", "num_gpu_blocks"),
    [
        pytest.param('block_size="128",engine="0",num_gpu_blocks="4096"', 128, 4096, id="both"),
        pytest.param('num_gpu_blocks="4096",engine="0",block_size="128"', 128, 4096, id="any-label-order"),
        pytest.param('block_size="16",engine="0",num_gpu_blocks="None"', 16, None, id="blocks-not-yet-profiled"),
        pytest.param('engine="0",model_name="m"', None, None, id="neither"),
    ],
)
def test_cache_config_labels(labels, block_size, num_gpu_blocks):
    stats = parse_engine_metrics(f"vllm:cache_config_info{{{labels}}} 1.0\n")

    assert (stats.block_size, stats.num_gpu_blocks) == (block_size, num_gpu_blocks)


def test_metric_names_must_match_exactly():
    text = "\n".join(
        [
            'vllm:num_requests_running_total{engine="0"} 9.0',
            'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0',
            'xvllm:num_requests_running{engine="0"} 9.0',
            'vllm:num_requests_running{engine="0"} 1.0',
        ]
    )

    stats = parse_engine_metrics(text)

    assert (stats.running, stats.waiting) == (1, 0)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n", id="only-comments"),
        pytest.param("python_gc_objects_collected_total 5.0\n", id="no-vllm-series"),
        pytest.param('vllm:num_requests_running{engine="0"} NaN-ish\n', id="unparsable-value"),
        pytest.param('vllm:num_requests_running{engine="0"}\n', id="missing-value"),
    ],
)
def test_missing_or_broken_series_leave_zeros(text):
    stats = parse_engine_metrics(text, now=5.0)

    assert stats == EngineStats(scraped_at=5.0)


def test_running_and_waiting_are_whole_numbers():
    stats = parse_engine_metrics('vllm:num_requests_running{engine="0"} 3.0\nvllm:num_requests_waiting{engine="0"} 1.0\n')

    assert (stats.running, stats.waiting) == (3, 1)
    assert isinstance(stats.running, int) and isinstance(stats.waiting, int)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param('vllm:num_requests_running{engine="0"} 3 1732700000000', id="labels-and-timestamp"),
        pytest.param("vllm:num_requests_running 3 1732700000000", id="timestamp-without-labels"),
        pytest.param("vllm:num_requests_running 3.0 ", id="trailing-space"),
    ],
)
def test_the_optional_timestamp_is_not_read_as_the_value(line):
    assert parse_engine_metrics(line + "\n").running == 3


# Whatever a pod sends, the parsers return a value: garbage lines are skipped,
# never raised on (an exception here once ended the pod's monitor for good).
@pytest.mark.parametrize(
    ("text", "running", "block_size", "num_gpu_blocks"),
    [
        pytest.param("vllm:num_requests_running NaN\n", 0, None, None, id="nan"),
        pytest.param("vllm:num_requests_running +Inf\n", 0, None, None, id="inf"),
        pytest.param("vllm:num_requests_running 1e999\n", 0, None, None, id="overflows-to-inf"),
        pytest.param("vllm:num_requests_running -3\n", 0, None, None, id="negative"),
        pytest.param("vllm:num_requests_running5\n", 0, None, None, id="name-without-value"),
        pytest.param("vllm:num_requests_running{ 3\n", 0, None, None, id="unclosed-labels"),
        pytest.param('vllm:cache_config_info{block_size="\u00b2",num_gpu_blocks="\u0663"} 1\n', 0, None, None, id="unicode-digits"),
        pytest.param('vllm:cache_config_info{num_gpu_blocks="' + "9" * 5000 + '"} 1\n', 0, None, None, id="5000-digit-label"),
        pytest.param('vllm:cache_config_info{block_size="0",num_gpu_blocks="0"} 1\n', 0, None, None, id="zero-sizes"),
        pytest.param("vllm:cache_config_info 1\n", 0, None, None, id="info-without-labels"),
        pytest.param("\ufffd\ufffd\nvllm:num_requests_running 2\n", 2, None, None, id="replaced-bytes-then-good-line"),
    ],
)
def test_garbage_is_skipped_never_raised(text, running, block_size, num_gpu_blocks):
    stats = parse_engine_metrics(text)

    assert (stats.running, stats.block_size, stats.num_gpu_blocks) == (running, block_size, num_gpu_blocks)


def test_kv_usage_is_a_fraction_at_most_one():
    assert parse_engine_metrics("vllm:kv_cache_usage_perc 7.5\n").kv_usage == 1.0


def test_counters_missing_from_a_scrape_keep_their_last_value():
    before = parse_engine_metrics("vllm:prefix_cache_queries_total 900\nvllm:prefix_cache_hits_total 300\nvllm:num_requests_running 4\n")

    after = parse_engine_metrics("vllm:num_requests_waiting 1\n", previous=before)

    assert (after.prefix_queries, after.prefix_hits) == (900.0, 300.0)  # no news is not a restart
    assert (after.running, after.waiting) == (0, 1)  # gauges are this scrape's


def test_invalid_utf8_loses_only_its_own_lines():
    body = b"vllm:num_requests_running 3\n\xff\xfe\xfd\nvllm:num_requests_waiting 2\n"

    stats = parse_engine_metrics(decode_text(body))

    assert (stats.running, stats.waiting) == (3, 2)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[]", id="empty-list"),
        pytest.param(b'"m"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"data": "m"}', id="data-string"),
        pytest.param(b'{"data": [1, null, "m"]}', id="entries-not-objects"),
        pytest.param(b'{"data": [{"id": ["m"]}, {"id": 5}, {"id": ""}]}', id="ids-not-strings"),
        pytest.param(b'{"data": []}', id="no-models"),
        pytest.param(b"\xff\xfe", id="invalid-utf8"),
        pytest.param(b"[" * 100_000, id="too-deep"),
        pytest.param(b"<html></html>", id="html"),
    ],
)
def test_a_model_list_of_the_wrong_shape_is_none(body):
    assert parse_models(body) is None


def test_model_list_names_and_the_first_integral_max_model_len():
    body = b'{"data": [{"id": "a", "max_model_len": true}, {"id": "b", "max_model_len": 2048.0}, 7, {"id": "c", "max_model_len": 4096}]}'

    assert parse_models(body) == ModelList(frozenset({"a", "b", "c"}), 4096)


def test_the_process_start_time_is_read_where_exported():
    text = "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 1.7327e+09\nprocess_start_time_seconds_x 5\n"

    assert parse_engine_metrics(text).started_at == pytest.approx(1.7327e09)
    assert parse_engine_metrics("vllm:num_requests_running 1\n").started_at is None


LOAD_COST_SERIES = """\
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny llama",source="local_compute"} 1500.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny llama",source="local_cache_hit"} 700.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny llama",source="external_kv_transfer"} 2900.0
vllm:prompt_tokens_by_source_total{engine="1",model_name="tiny llama",source="local_compute"} 500.0
vllm:request_prefill_time_seconds_bucket{engine="0",le="+Inf",model_name="tiny llama"} 7.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="tiny llama"} 1.25
vllm:request_prefill_time_seconds_count{engine="0",model_name="tiny llama"} 7.0
"""


def test_the_figures_the_load_cost_learns_from_are_read():
    stats = parse_engine_metrics(LOAD_COST_SERIES)

    assert stats.computed_tokens == 2000.0, "only the tokens the engines computed"
    assert (stats.prefill_seconds, stats.prefill_requests) == (1.25, 7.0)
    assert parse_engine_metrics("", previous=stats).computed_tokens == 2000.0, "a counter keeps its last value"


def _restricted(page: str, names: tuple[str, ...]) -> str:
    """`page` as prometheus_client serves it for `name[]=...`: the samples of those names only."""
    return "".join(line + "\n" for line in page.splitlines() if line.split("{")[0].split(" ")[0] in names)


def test_the_restricted_page_holds_every_series_the_router_reads():
    page = (
        TWO_ENGINES
        + LOAD_COST_SERIES
        + "process_start_time_seconds 1.7327e+09\n"
        + 'vllm:prompt_tokens_cached_by_source_total{engine="0",source="device"} 96.0\n'
        + 'vllm:gpu_cache_usage_perc{engine="0"} 0.25\n'
    )
    full = parse_engine_metrics(page, now=0.0)
    assert full.started_at and full.cached_by_source and full.kv_usage and full.computed_tokens

    assert parse_engine_metrics(_restricted(page, SERIES), now=0.0) == full
    assert "name%5B%5D=vllm%3Anum_requests_running" in FILTERED_METRICS_PATH
    assert FILTERED_METRICS_PATH.startswith("/metrics/?")
