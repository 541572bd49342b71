"""Reads a vLLM engine's Prometheus text into `EngineStats`.

Only the handful of series the router uses are read, line by line, which is
several times faster than a full exposition parser on vLLM's large histogram
output. Values of one name are summed over label sets (several models or
engines behind one URL), except KV usage, a fraction, where the fullest engine
counts. Unknown or missing series leave the field at zero.
"""

from __future__ import annotations

import re
import time

from router.pods import EngineStats

_SUMMED = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:external_prefix_cache_queries_total": "external_queries",
    "vllm:external_prefix_cache_hits_total": "external_hits",
}
_CACHE_INFO = "vllm:cache_config_info"
_BY_SOURCE = "vllm:prompt_tokens_cached_by_source_total"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_engine_metrics(text: str, *, now: float | None = None) -> EngineStats:
    """Extract the router's figures from a /metrics body.

    Args:
        text: Prometheus text exposition from a vLLM engine.
        now: timestamp to stamp the result with (monotonic clock by default).

    Returns:
        The stats; `block_size` and `num_gpu_blocks` come from `vllm:cache_config_info` labels.
    """
    sums: dict[str, float] = {}
    block_size = num_gpu_blocks = None
    by_source: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        name = line[: brace if 0 <= brace < space else space]
        if name == _CACHE_INFO:
            labels = dict(_LABEL.findall(line[brace:line.rfind("}")]))
            if labels.get("block_size", "").isdigit():
                block_size = int(labels["block_size"])
            if labels.get("num_gpu_blocks", "").isdigit():
                # Several engines behind one URL: their capacities add up.
                num_gpu_blocks = (num_gpu_blocks or 0) + int(labels["num_gpu_blocks"])
            continue
        if name == _BY_SOURCE:
            source = dict(_LABEL.findall(line[brace : line.rfind("}")])).get("source", "")
            try:
                by_source[source] = by_source.get(source, 0.0) + float(line[line.rfind("}") + 1 :].split()[0])
            except (IndexError, ValueError):
                pass
            continue
        field = _SUMMED.get(name)
        if field is None:
            continue
        try:
            value = float(line[space:].split()[0]) if brace < 0 else float(line[line.rfind("}") + 1 :].split()[0])
        except (IndexError, ValueError):
            continue
        if field == "kv_usage":
            sums[field] = max(sums.get(field, 0.0), value)  # a fraction: the fullest engine counts
        else:
            sums[field] = sums.get(field, 0.0) + value
    return EngineStats(
        running=int(sums.get("running", 0)),
        waiting=int(sums.get("waiting", 0)),
        kv_usage=sums.get("kv_usage", 0.0),
        prefix_queries=sums.get("prefix_queries", 0.0),
        prefix_hits=sums.get("prefix_hits", 0.0),
        external_queries=sums.get("external_queries", 0.0),
        external_hits=sums.get("external_hits", 0.0),
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        cached_by_source=by_source,
        scraped_at=time.monotonic() if now is None else now,
    )
