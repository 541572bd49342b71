"""Latency each gateway adds per request, and the request rate it sustains on one core.

A thin entry point to the gateway-overhead part of `kvgate bench`: no vLLM
engines, only a stub engine that answers at once with kvgate, SGLang's router
and vllm-router in front of it in turn. It is the same as

    kvgate bench --workloads none --routers none [--overhead-routers LIST] [--quick] [--out DIR]

and writes the same results folder (JSON, Markdown table, overhead plot).
"""

from __future__ import annotations

import sys

from kvgate.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--workloads", "none", "--routers", "none", *sys.argv[1:]]))
