"""Replay a benchmark run's placements on modelled engine caches, with other placements on the same timeline.

    kvgate bench --workloads mixed --routers kvgate:kv-aware --out results/run
    python scripts/replay_placement.py results/run [--workload mixed]

For every run whose records name the engine of each request (kvgate's), prints
the engines' measured hit rate, the modelled one of the recorded placement
(how far the model is from the engines), and the modelled ones of the same
requests, sent and finished at the same times, placed `pinned` (each user on
its first engine), by SGLang's `cache_aware` rule, and `partitioned` (told which users
send once: a reference no router can reach; `kvgate.bench.lru_replay`).
The traces are rebuilt from the folder's sizes and seed with the model's
tokenizer (`--model`, default as `kvgate bench`'s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvgate.bench.bound import block_chain
from kvgate.bench.config import full
from kvgate.bench.lru_replay import Placed, cache_aware, partitioned, pinned, replay
from kvgate.bench.report import RECORDS_DIR, records_name
from kvgate.bench.sizes_file import apply_sizes
from kvgate.bench.workloads import build_workload
from kvgate.model import default_model_dir
from router.tokenize import PromptTokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("results", type=Path, help="a `kvgate bench` results folder")
    parser.add_argument("--workload", help="only this workload")
    parser.add_argument("--model", type=Path, help="model directory (its tokenizer rebuilds the traces)")
    args = parser.parse_args()
    try:
        results = json.loads((args.results / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"{args.results}: {exc}", file=sys.stderr)
        return 1
    config = results["config"]
    sizes = apply_sizes(config["sizes"], full().sizes, source="results.json")
    home = os.environ.get("KVGATE_HOME")
    encoder = PromptTokenizer.from_model_dir(args.model or default_model_dir(Path(home) if home else None))
    engines, blocks, size = config["engines"], config["kv_blocks"], config["block_size"]
    traces: dict[str, dict[str, tuple[str, tuple[int, ...], int, int]]] = {}
    print("| run | measured | replayed | pinned | cache_aware | partitioned | overcommitted |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in results["runs"]:
        workload = run["workload"]
        if run.get("summary") is None or (args.workload and workload != args.workload):
            continue
        repeat = run["repeat"] if results["repeats"] > 1 else None
        path = args.results / RECORDS_DIR / records_name(workload, run["router"], run["engine_set"], repeat)
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        if not records or any(r["pod"] is None or r["done_s"] is None for r in records):
            continue  # a peer router (no engine named) or failed requests
        if workload not in traces:
            trace = build_workload(workload, sizes, config["seed"], encoder)
            traces[workload] = {
                r.id: (r.user, tuple(block_chain(tokens, size)), len(tokens), r.max_tokens)
                for r in trace.requests()
                for tokens in [encoder.encode_chat(r.chat())]
            }
        pods = sorted({r["pod"] for r in records})
        placed = []
        for r in records:
            user, chain, prompt, max_tokens = traces[workload][r["request_id"]]
            placed.append(Placed(user, chain, prompt, max_tokens, pods.index(r["pod"]), r["sent_s"], r["done_s"]))
        placements = (placed, pinned(placed), cache_aware(placed, engines), partitioned(placed, engines))
        rows = [replay(p, engines, blocks, size) for p in placements]
        figures = " | ".join(f"{row.rate:.3f}" for row in rows)
        print(f"| {path.stem} | {run['summary']['hit_rate']:.3f} | {figures} | {rows[0].overcommitted} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
