"""Reads what a vLLM engine says about itself: its /metrics text and its /v1/models list.

`parse_engine_metrics` turns Prometheus text into `EngineStats`; `parse_models`
turns a /v1/models body into model names and the longest prompt. Both are
pure and total: whatever bytes a pod sends (an empty list, a JSON string,
invalid UTF-8, a value of `NaN`, a label of 10^30 blocks) they return a value
or `None`, never raise, so one bad answer cannot stop the monitor that calls
them (`router.monitor`). Nothing here does I/O.

Only the handful of series the router uses are read (`SERIES`; the monitor
asks vLLM for those alone), line by line, which is several times faster than
a full exposition parser on vLLM's large histogram output. Values of one name
are summed over label sets (several models or engines behind one URL), except
KV usage, a fraction, where the fullest engine counts; of the TTFT histogram
only its sum and count are read (the adaptive limits of `router.concurrency`
use their deltas). `process_start_time_seconds`,
where exported, tells a restarted engine. Gauges missing from a scrape read
zero; counters missing from it keep their previous value, so one truncated
answer does not look like a restarted engine (whose counters went backwards)
and cost the pod its cached prefixes.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from router.pods import EngineStats, lora_adapters

_SUMMED = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:external_prefix_cache_queries_total": "external_queries",
    "vllm:external_prefix_cache_hits_total": "external_hits",
    "vllm:request_prefill_time_seconds_sum": "prefill_seconds",
    "vllm:request_prefill_time_seconds_count": "prefill_requests",
    "vllm:time_to_first_token_seconds_sum": "ttft_sum",
    "vllm:time_to_first_token_seconds_count": "ttft_count",
}
_COUNTERS = (
    "prefix_queries", "prefix_hits", "external_queries", "external_hits", "computed_tokens", "prefill_seconds",
    "prefill_requests", "ttft_sum", "ttft_count",
)  # fmt: skip
_CACHE_INFO = "vllm:cache_config_info"
#: prometheus_client's process collector: vLLM exports it unless it runs several API server processes.
_STARTED = "process_start_time_seconds"
_BY_SOURCE = "vllm:prompt_tokens_cached_by_source_total"
#: Prompt tokens by how the engine got them; the `local_compute` ones are those it computed.
_PROMPT_BY_SOURCE = "vllm:prompt_tokens_by_source_total"
_MAX_SOURCES = 16
#: Every series `parse_engine_metrics` reads.
SERIES: tuple[str, ...] = (*_SUMMED, _CACHE_INFO, _STARTED, _BY_SOURCE, _PROMPT_BY_SOURCE)
#: vLLM's page of those series only. Its metrics app (prometheus_client's) also answers under
#: /metrics/, where `name[]` restricts the page to the series named: it collects only those, so
#: the engine's API server, which serves /metrics on the event loop that streams its answers,
#: spends about a fifth of the time on it (1.4 ms against 6.5 ms on an idle engine here), sends
#: 5 KB instead of 50 KB, and the gateway parses it in a quarter of the time. (Under load, the
#: client's TTFT exceeded the engines' own by 221 ms through kvgate scraping the full page every
#: 0.5 s and by 118 ms scraping it every 2 s, one `kvgate bench` run each; with this page the
#: gap stayed within run-to-run spread, so the gain in TTFT is not shown.)
FILTERED_METRICS_PATH = "/metrics/?" + urlencode([("name[]", name) for name in SERIES])
#: A series every vLLM page has: a page without it is not a restricted vLLM page (the path
#: means something else there), and the pod is scraped at /metrics.
SIGN_OF_VLLM = "vllm:num_requests_running"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
#: Largest block size and block count believed; larger labels are garbage.
_MAX_BLOCK_SIZE = 1 << 16
_MAX_BLOCKS = 1 << 40


@dataclass(frozen=True, slots=True)
class ModelList:
    """What a pod's /v1/models answer says."""

    names: frozenset[str]
    max_model_len: int | None
    adapters: frozenset[str] = frozenset()
    """The LoRA adapters among `names` (`router.pods.lora_adapters`)."""


def _count(text: str, limit: int) -> int | None:
    """A label value that is a positive whole number no larger than `limit` (ASCII digits only)."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text[:20])  # 20 digits exceed any limit: no long-integer work on garbage
    return value if 0 < value <= limit else None


def parse_engine_metrics(text: str, *, now: float | None = None, previous: EngineStats | None = None) -> EngineStats:
    """Extract the router's figures from a /metrics body.

    Args:
        text: Prometheus text exposition from a vLLM engine (any text: garbage
            lines are skipped).
        now: timestamp to stamp the result with (monotonic clock by default).
        previous: the pod's last stats; its counters stand in for counters this
            text lacks.

    Returns:
        The stats; `block_size` and `num_gpu_blocks` come from `vllm:cache_config_info`
        labels. Non-finite values are skipped; counts are never negative.
    """
    sums: dict[str, float] = {}
    block_size = num_gpu_blocks = None
    started_at = None
    by_source: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if space < 0 and brace < 0:
            continue  # a name alone: no value
        name = line[: brace if 0 <= brace < space or space < 0 <= brace else space]
        if name == _CACHE_INFO:
            labels = dict(_LABEL.findall(line[brace : line.rfind("}")])) if brace >= 0 else {}
            size = _count(labels.get("block_size", ""), _MAX_BLOCK_SIZE)
            if size is not None:
                block_size = size
            blocks = _count(labels.get("num_gpu_blocks", ""), _MAX_BLOCKS)
            if blocks is not None:
                # Several engines behind one URL: their capacities add up.
                num_gpu_blocks = min((num_gpu_blocks or 0) + blocks, _MAX_BLOCKS)
            continue
        if name == _BY_SOURCE:
            source = dict(_LABEL.findall(line[brace : line.rfind("}")])).get("source", "") if brace >= 0 else ""
            try:
                value = float(line[line.rfind("}") + 1 :].split()[0])
            except (IndexError, ValueError):
                continue
            # Bounded: a pod inventing sources cannot grow this map (vLLM has a handful).
            if math.isfinite(value) and value >= 0 and (source in by_source or len(by_source) < _MAX_SOURCES):
                by_source[source] = by_source.get(source, 0.0) + value
            continue
        if name == _PROMPT_BY_SOURCE:
            if brace < 0 or 'source="local_compute"' not in line[brace : line.rfind("}")]:
                continue
            field: str | None = "computed_tokens"
        else:
            field = _SUMMED.get(name)
        if field is None and name != _STARTED:
            continue
        try:
            value = float(line[space:].split()[0]) if brace < 0 else float(line[line.rfind("}") + 1 :].split()[0])
        except (IndexError, ValueError):
            continue
        if not math.isfinite(value) or value < 0:
            continue
        if field is None:
            started_at = value
        elif field == "kv_usage":
            sums[field] = max(sums.get(field, 0.0), min(value, 1.0))  # a fraction: the fullest engine counts
        else:
            sums[field] = sums.get(field, 0.0) + value
    if previous is not None:
        for name in _COUNTERS:
            sums.setdefault(name, getattr(previous, name))
    return EngineStats(
        running=int(min(sums.get("running", 0), 1e12)),
        waiting=int(min(sums.get("waiting", 0), 1e12)),
        kv_usage=sums.get("kv_usage", 0.0),
        prefix_queries=sums.get("prefix_queries", 0.0),
        prefix_hits=sums.get("prefix_hits", 0.0),
        external_queries=sums.get("external_queries", 0.0),
        external_hits=sums.get("external_hits", 0.0),
        computed_tokens=sums.get("computed_tokens", 0.0),
        prefill_seconds=sums.get("prefill_seconds", 0.0),
        prefill_requests=sums.get("prefill_requests", 0.0),
        ttft_sum=sums.get("ttft_sum", 0.0),
        ttft_count=sums.get("ttft_count", 0.0),
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        started_at=started_at,
        cached_by_source=by_source,
        scraped_at=time.monotonic() if now is None else now,
    )


def decode_text(body: bytes) -> str:
    """A /metrics body as text; bytes that are not UTF-8 become U+FFFD, so their lines are skipped."""
    return body.decode("utf-8", errors="replace")


def parse_models(body: bytes) -> ModelList | None:
    """Read a /v1/models answer (`{"data": [{"id": ..., "max_model_len": ...}, ...]}`).

    Args:
        body: the raw answer.

    Returns:
        The model names and the first integral `max_model_len`, or None when the
        body is not that shape or names no model (the pod cannot be routed to yet).
    """
    try:
        payload: Any = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    entries = [m for m in data if isinstance(m, dict)]
    names = frozenset(m["id"] for m in entries if isinstance(m.get("id"), str) and m["id"])
    if not names:
        return None
    lens = [m.get("max_model_len") for m in entries]
    max_len = next((n for n in lens if type(n) is int and n > 0), None)
    return ModelList(names, max_len, lora_adapters(entries))
