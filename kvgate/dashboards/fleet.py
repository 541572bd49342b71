"""The fleet dashboard: how much prefill the fleet saves, where from, and how it serves.

One function per row. Engine figures come from each vLLM engine's own
``/metrics`` (scraped directly, with a ``pod`` label added by the scrape
config so it matches the gateway's); the router's prediction and the request
outcomes come from the gateway (``kvgate_*``).
"""

from __future__ import annotations

from typing import Any

from kvgate.dashboards.panels import MODEL, POD, RATE, Query, Row, dashboard, stat, timeseries

#: Matchers of engine series: the chosen models and pods.
ENGINE = f"{MODEL},{POD}"


def _rate(metric: str, matchers: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{matchers}}}[{RATE}]))"


def savings_row() -> Row:
    cached = _rate("vllm:prompt_tokens_cached_by_source_total", ENGINE)
    prompt = _rate("vllm:prompt_tokens_total", ENGINE)
    return Row(
        "Saved prefill",
        [
            timeseries(
                "Prompt tokens: from cache vs computed",
                Query(cached, "from cache"),
                Query(f"{prompt} - {cached}", "computed"),
                unit="short",
                stack=True,
                description="Prompt tokens per second the engines took from a cache (any tier) and those they had to compute.",
            ),
            stat(
                "Prompt tokens served from cache",
                Query(f"{cached} / {prompt}"),
                unit="percentunit",
                description="Share of prompt tokens whose KV came from a cache rather than prefill.",
            ),
            timeseries(
                "Engine-confirmed prefix hit rate",
                Query(
                    f"{_rate('vllm:prefix_cache_hits_total', ENGINE, 'pod')} / {_rate('vllm:prefix_cache_queries_total', ENGINE, 'pod')}",
                    "{{pod}}",
                ),
                Query(f"{_rate('vllm:prefix_cache_hits_total', ENGINE)} / {_rate('vllm:prefix_cache_queries_total', ENGINE)}", "fleet"),
                unit="percentunit",
                description="Prompt tokens found in each engine's own prefix cache (GPU/device), per pod and for the fleet.",
            ),
        ],
    )


def tiers_row() -> Row:
    return Row(
        "Hits by tier",
        [
            timeseries(
                "Cached prompt tokens by tier",
                Query(_rate("vllm:prompt_tokens_cached_by_source_total", ENGINE, "source"), "{{source}}"),
                unit="short",
                stack=True,
                description="device = the engine's GPU prefix cache, host = L1 (connector, process memory), "
                "p2p = L2 (cache nodes), disk = L3 (Redis or disk). Tokens per second, from vLLM.",
            ),
            timeseries(
                "External cache hit rate",
                Query(
                    f"{_rate('vllm:external_prefix_cache_hits_total', ENGINE, 'pod')} / "
                    f"{_rate('vllm:external_prefix_cache_queries_total', ENGINE, 'pod')}",
                    "{{pod}}",
                ),
                unit="percentunit",
                description="Of the prompt tokens an engine did not have, the share the shared KV cache supplied.",
            ),
            timeseries(
                "Connector blocks by tier",
                Query(f'sum by (tier) (rate(kvgate_kvcache_hits_total{{{MODEL},tier=~"l1|l2|l3"}}[{RATE}]))', "{{tier}}"),
                Query(f"sum(rate(kvgate_kvcache_misses_total{{{MODEL}}}[{RATE}]))", "miss"),
                unit="short",
                stack=True,
                description="KV blocks per second the engines' connectors found in each tier, and found nowhere.",
            ),
        ],
    )


def accuracy_row() -> Row:
    predicted = f"{_rate('kvgate_predicted_prefix_hit_tokens_total', POD)} / {_rate('kvgate_prompt_tokens_total', POD)}"
    confirmed = (
        f"{_rate('kvgate_engine_prefix_cache_hits_total', POD)} / {_rate('kvgate_engine_prefix_cache_queries_total', POD)}"
    )
    return Row(
        "Router accuracy",
        [
            timeseries(
                "Predicted vs engine-confirmed hit rate",
                Query(predicted, "predicted by the router"),
                Query(confirmed, "confirmed by the engines"),
                unit="percentunit",
                description="The router's prefix index predicts hits when it routes; the engines report what they found. "
                "A widening gap means the index believes in blocks the engines have evicted.",
            ),
            timeseries(
                "Prediction gap per pod",
                Query(
                    f"{_rate('kvgate_predicted_prefix_hit_tokens_total', POD, 'pod')} / {_rate('kvgate_prompt_tokens_total', POD, 'pod')}"
                    f" - {_rate('kvgate_engine_prefix_cache_hits_total', POD, 'pod')} / "
                    f"{_rate('kvgate_engine_prefix_cache_queries_total', POD, 'pod')}",
                    "{{pod}}",
                ),
                unit="percentunit",
                description="Predicted minus confirmed hit rate, per pod (positive: the router is optimistic).",
            ),
        ],
    )


def latency_row() -> Row:
    ttft = _rate("vllm:time_to_first_token_seconds_bucket", ENGINE, "le")
    ttfb = _rate("kvgate_time_to_first_byte_seconds_bucket", "", "le")
    return Row(
        "Latency",
        [
            timeseries(
                "Time to first token (engines)",
                *(Query(f"histogram_quantile({q}, {ttft})", f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)),
                unit="s",
                description="From vLLM's own histogram: arrival at the engine to its first token.",
            ),
            timeseries(
                "Time to first byte (gateway)",
                *(Query(f"histogram_quantile({q}, {ttfb})", f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)),
                unit="s",
                description="Arrival at the gateway to the pod's first response byte: routing, queueing and prefill.",
            ),
        ],
    )


def requests_row() -> Row:
    return Row(
        "Requests and health",
        [
            timeseries(
                "Requests by pod and status",
                Query(_rate("kvgate_requests_total", POD, "pod, status"), "{{pod}} {{status}}"),
                unit="reqps",
                description="Answers per second, by the pod that served them and HTTP status.",
            ),
            timeseries(
                "Errors by pod and status",
                Query(_rate("kvgate_requests_total", f'{POD},status!~"2.."', "pod, status"), "{{pod}} {{status}}"),
                unit="reqps",
                description="Non-2xx answers per second (the gateway retries 502/503/504 on another pod first).",
            ),
            timeseries(
                "Retries and stream errors",
                Query(_rate("kvgate_upstream_retries_total", POD, "pod"), "retry {{pod}}"),
                Query(_rate("kvgate_stream_errors_total", POD, "pod"), "stream error {{pod}}"),
                unit="reqps",
                description="Requests re-sent after a pod failed before answering; streams cut off mid-answer.",
            ),
            timeseries(
                "Pod health",
                Query(f"sum by (pod) (kvgate_pod_healthy{{{POD}}})", "{{pod}}"),
                unit="bool",
                description="1 while the gateway routes to the pod (health probes pass).",
            ),
            stat(
                "Scrape targets up",
                Query('sum by (job) (up{job=~"kvgate.*|vllm.*"})', "{{job}}"),
                description="Processes Prometheus reaches, per job.",
            ),
        ],
    )


def build() -> dict[str, Any]:
    """The fleet dashboard's JSON."""
    return dashboard(
        "kvgate / Fleet",
        "kvgate-fleet",
        "Prefill saved by caching, hits by tier, the router's accuracy, latency, requests and pod health.",
        [savings_row(), tiers_row(), accuracy_row(), latency_row(), requests_row()],
    )
