"""The benchmark's outputs: `results.json`, `results.md` and PNG plots in one folder.

- `results.json`: every figure of every run, the workloads, the config and
  the machine; non-finite numbers are written as null, so a missing figure
  is visible as such;
- `records/<workload>--<router>[@set][--r<repeat>].jsonl`: every request of
  every run (send, first-token and end times, status, tokens, serving pod
  when known);
- `results.md`: one table per workload (routers on each engine set as rows)
  and one for the gateway overhead, with the command and the machine they
  came from; when replicas ran, their ratios to one router
  (`kvgate.bench.replica_report`); when SGLang's `cache_aware` ran, each
  kvgate row's ratios to it, of the medians and repeat by repeat
  (`kvgate.bench.comparison`);
- `hit_rate.png`, `ttft.png`, `fairness.png`, `overhead.png` (matplotlib,
  headless).

Called by `kvgate.bench.cli`; reads nothing but its arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvgate.bench.aggregate import RouterRow, rows
from kvgate.bench.comparison import markdown_lines as comparison_lines
from kvgate.bench.engine_sets import row_label
from kvgate.bench.replica_report import markdown_lines as replica_lines
from kvgate.bench.routers import file_label
from kvgate.bench.runner import BenchResults
from kvgate.bench.summary import RunSummary

#: Files every complete run writes (plots only for what was measured).
JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
RECORDS_DIR = "records"

_FAMILY_COLOURS = {"kvgate": "Blues", "sglang": "Oranges", "vllm-router": "Greens"}


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: dataclasses and mappings as dicts, non-finite floats as None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return value.name
    return value


def write_json(results: BenchResults, meta: Mapping[str, Any], out: Path) -> Path:
    """Write `results.json` (without per-request records, see `write_records`); returns its path."""
    body = jsonable(results)
    for run in body["runs"]:
        run.pop("records", None)
    payload = {"meta": jsonable(meta), "complete": results.complete, **body}
    path = out / JSON_NAME
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def records_name(workload: str, router: str, engine_set: str, repeat: int | None) -> str:
    """The records file of one run: `<workload>--<router>[--r<repeat>].jsonl` (repeat None: not repeated)."""
    name = f"{workload}--{file_label(row_label(router, engine_set))}"
    return f"{name}--r{repeat}.jsonl" if repeat is not None else f"{name}.jsonl"


def write_records(results: BenchResults, out: Path) -> list[Path]:
    """Write every run's per-request records, one JSON object a line, to `records/<workload>--<router>.jsonl`."""
    folder = out / RECORDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for run in results.runs:
        repeat = run.repeat if results.repeats > 1 else None
        path = folder / records_name(run.workload, run.router, run.engine_set, repeat)
        path.write_text("".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in run.records))
        written.append(path)
    return written


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_range(
    row: RouterRow, figure: str, text: str, repeats: int, digits: int = 0, thousands: bool = False
) -> str:
    """`text`, then the figure's range over repeats in brackets when there were several."""
    found = row.spreads.get(figure)
    if repeats <= 1 or found is None:
        return text
    form = f"{{:,.{digits}f}}" if thousands else f"{{:.{digits}f}}"
    return f"{text} ({form.format(found.low)}-{form.format(found.high)})"


def markdown(results: BenchResults, meta: Mapping[str, Any]) -> str:
    """The Markdown report (see the module docstring)."""
    config = results.config
    lines = [
        f"# kvgate bench, {results.started_at}",
        "",
        f"Command: `{meta.get('command', 'kvgate bench')}`  ",
        f"Machine: {meta.get('machine', 'unknown')}  ",
    ]
    if results.runs:
        lines.append(
            f"Engines: {config.engines} x vLLM CPU ({meta.get('vllm', '?')}), tiny Llama with random weights, "
            f"{config.kv_blocks} KV blocks of {config.block_size} tokens each, max_model_len {config.max_model_len}, "
            f"one thread each; seed {config.seed}; peers: sglang-router {meta.get('sglang_router', '?')}, "
            f"vllm-router {meta.get('vllm_router', '?')}"
        )
    lines += [
        "",
        (
            "Hit rate: the engines' own `prefix_cache_hits / prefix_cache_queries` over the run. Bound: the share of "
            "prompt tokens in full blocks already sent earlier in the trace (its own history included), at most "
            "prompt - 1 per request: what one infinite cache shared by all engines would hit. TTFT and E2E over "
            "successful streamed requests; throughput over the run (timed workloads: over their duration). "
            "Service: 1 x prompt + 2 x generated tokens per user; Jain's index over users."
        ),
    ]
    lines += [
        "",
        (
            "Prefill computed: prompt tokens the engines computed themselves (vLLM's "
            "`prompt_tokens_by_source{source=local_compute}`), against the least the trace allows (prompt tokens "
            "less the bound's hits) in brackets; loaded: prompt tokens loaded from the shared KV cache "
            "(`external_prefix_cache_hits`)."
        ),
    ]
    if len(results.engine_sets) > 1 or results.engine_sets != ("plain",):
        lines += [
            "",
            (
                "Engine sets: a plain router name ran on plain engines (each with only its own prefix cache); "
                "`@shared` on the same engines wired to kvgate's shared KV cache as `kvgate up` wires them (L1 in "
                "each engine, 2 L2 cache nodes, L3 in a local directory), started afresh for each run."
            ),
        ]
    if results.repeats > 1:
        lines += [
            "",
            (
                f"Every router replayed every workload {results.repeats} times on every engine set, each repeat "
                "starting one engine set and one router further down their lists; a row shows medians over its "
                "repeats (requests and failures summed), with the range (min-max) of hit rate, TTFT p50 and p90 "
                "and prefill computed in brackets."
            ),
        ]
    for info in results.workloads:
        lines += ["", f"## {info.name}", "", info.description + ".", ""]
        if info.bound_nominal is not None:
            lines += [f"Bound of the whole trace: {info.bound_nominal:.3f}.", ""]
        timed = info.duration_s is not None
        restart = info.params.get("restart_at")
        if restart is not None:
            lines += [f"Engine 0 is killed and started again once {restart:.0%} of the requests have finished.", ""]
        header = (
            "| router | hit rate | bound | hit/bound | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | E2E p50 ms | "
            "E2E p99 ms | req/s | out tok/s | failed | Jain | requests per engine | preemptions | "
            "prefill computed (least) | loaded |"
        )
        if timed:
            header += " light share (fair / VTC floor) |"
        lines += [header, "|" + " --- |" * (header.count("|") - 1)]
        table = rows(results, info.name)
        for row in table:
            s = row.summary
            if s is None:
                lines.append(
                    f"| {row.label} | failed: {(row.errors[0] if row.errors else '').splitlines()[0][:120]} |"
                )
                continue
            hit = _with_range(row, "hit_rate", f"{s.hit_rate:.3f}", results.repeats, 3)
            ttft = _with_range(row, "ttft_ms_p50", _fmt(s.ttft_ms_p50), results.repeats)
            ttft90 = _with_range(row, "ttft_ms_p90", _fmt(s.ttft_ms_p90), results.repeats)
            prefill = _with_range(
                row, "prefill_tokens_computed", f"{s.prefill_tokens_computed:,.0f}", results.repeats, thousands=True
            )
            failed = f"{s.requests_failed}/{s.requests_sent}"
            if row.errors:
                failed += f", {len(row.errors)} runs failed"
            per_engine = "/".join(str(int(e.requests)) for e in s.engines)
            line = (
                f"| {row.label} | {hit} | {s.hit_rate_bound:.3f} | {_fmt(s.hit_rate_vs_bound, 2)} | "
                f"{ttft} | {ttft90} | {_fmt(s.ttft_ms_p99)} | {_fmt(s.latency_ms_p50)} | "
                f"{_fmt(s.latency_ms_p99)} | {s.throughput_rps:.2f} | {s.output_tokens_per_s:.0f} | "
                f"{failed} | {_fmt(s.jain_index, 3)} | {per_engine} | {int(s.preemptions)} | "
                f"{prefill} ({s.min_prefill_tokens:,}) | {s.external_hit_tokens:,.0f} |"
            )
            if timed:
                line += (
                    f" {_fmt(s.light_share, 3)} ({_fmt(s.light_share_fair, 3)} / {_fmt(s.light_share_vtc_floor, 3)}) |"
                )
            lines.append(line)
        lines += [
            "",
            (
                "Where the time goes, means per request: TTFT at the client; the engines' own TTFT (from the "
                "request's arrival in the engine core: the difference is the router, the engine's HTTP front end "
                "and the wire), queue, prefill and decode times (vLLM's histograms); the router process's CPU time and "
                "how long its threads were ready to run but waited for a core; "
                "the share of the cores used by processes outside the benchmark during the run (high means the run "
                "is noise); for kvgate, its own TTFT (from a request's arrival in its handler to the pod's first "
                "byte) and the part of it spent waiting for a slot, over how many engines each user's requests "
                "went and the hit rate it predicted:"
            ),
            "",
            (
                "| router | TTFT ms | engine TTFT ms | engine queue ms | engine prefill ms | engine decode ms | "
                "router CPU ms | router waits for a core ms | others' CPU % | gateway TTFT ms (queued) | "
                "engines per user | predicted hit rate |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in table:
            s = row.summary
            if s is None:
                continue
            others = None if row.others_cpu_share is None else 100.0 * row.others_cpu_share
            lines.append(
                f"| {row.label} | {_fmt(s.ttft_ms_mean)} | {_fmt(s.engine_ttft_ms_mean)} | "
                f"{_fmt(s.engine_queue_ms_mean)} | {_fmt(s.engine_prefill_ms_mean)} | {_fmt(s.engine_decode_ms_mean)} | "
                f"{_fmt(row.router_cpu_ms)} | {_fmt(row.router_wait_ms)} | {_fmt(others, 0)} | {_own_ttft(s)} | "
                f"{_fmt(s.pods_per_user, 2)} | {_fmt(predicted_hit_rate(s.router_metrics), 3)} |"
            )
    overhead = results.overhead
    if overhead is not None or results.overhead_error:
        lines += ["", "## Gateway overhead (stub engine that answers at once)", ""]
        if overhead is None:
            lines.append(f"Not measured: {results.overhead_error}")
        else:
            pinning = "gateway pinned to CPU 0, stub and client to CPU 1" if overhead.pinned else "no CPU pinning"
            lines += [
                (
                    f"Sequential non-streamed chat requests, direct vs through the gateway; sustained rate: "
                    f"closed-loop clients, rising concurrency until the rate stops growing ({pinning}). The stub and "
                    f"client alone reach {overhead.stub_max_rps:.0f} req/s: a gateway marked client-bound may "
                    f"sustain more."
                ),
                "",
                "| gateway | direct p50 ms | via p50 ms | added p50 ms | added p99 ms | max req/s (1 core) | at clients | vs SGLang | errors |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            sglang = next((g.max_rps for g in overhead.gateways if g.router.startswith("sglang:")), None)
            for g in overhead.gateways:
                ratio = _fmt(g.max_rps / sglang, 2) if sglang else "n/a"
                bound = " (client-bound)" if g.client_bound else ""
                lines.append(
                    f"| {g.router} | {g.direct_ms_p50:.3f} | {g.via_ms_p50:.3f} | {g.added_ms_p50:.3f} | "
                    f"{g.added_ms_p99:.3f} | {g.max_rps:.0f}{bound} | {g.max_rps_concurrency} | {ratio} | {g.errors} |"
                )
            for name, why in overhead.failures.items():
                lines.append(f"| {name} | failed: {why.splitlines()[0][:120]} |")
    lines += comparison_lines(results)
    lines += replica_lines(results)
    return "\n".join(lines) + "\n"


def _metric_sum(metrics: Mapping[str, float], name: str) -> float | None:
    values = [v for series, v in metrics.items() if series == name or series.startswith(name + "{")]
    return sum(values) if values else None


def predicted_hit_rate(metrics: Mapping[str, float]) -> float | None:
    """kvgate's own predicted hit rate over a run (predicted hit tokens / prompt tokens), if it reported one."""
    hits = _metric_sum(metrics, "kvgate_predicted_prefix_hit_tokens_total")
    prompts = _metric_sum(metrics, "kvgate_prompt_tokens_total")
    if hits is None or not prompts:
        return None
    return hits / prompts


def _own_ttft(summary: RunSummary) -> str:
    own = gateway_ttft_ms(summary.router_metrics)
    if own is None:
        return "n/a"
    return f"{_fmt(own)} ({_fmt(admission_wait_ms(summary.router_metrics, summary.requests_sent))})"


def gateway_ttft_ms(metrics: Mapping[str, float]) -> float | None:
    """kvgate's own mean time from a request's arrival in its handler to the pod's first byte, if it reported one."""
    seconds = _metric_sum(metrics, "kvgate_time_to_first_byte_seconds_sum")
    count = _metric_sum(metrics, "kvgate_time_to_first_byte_seconds_count")
    return None if seconds is None or not count else seconds / count * 1000.0


def admission_wait_ms(metrics: Mapping[str, float], requests: int) -> float | None:
    """kvgate's time in its admission queue, averaged over every request sent (most wait none), if reported."""
    seconds = _metric_sum(metrics, "kvgate_admission_wait_seconds_sum")
    return None if seconds is None or not requests else seconds / requests * 1000.0


def write_markdown(results: BenchResults, meta: Mapping[str, Any], out: Path) -> Path:
    """Write `results.md`; returns its path."""
    path = out / MARKDOWN_NAME
    path.write_text(markdown(results, meta))
    return path


def _colours(routers: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    by_family: dict[str, list[str]] = {}
    for name in routers:
        by_family.setdefault(name.split(":", 1)[0], []).append(name)
    colours = {}
    for family, names in by_family.items():
        cmap = colormaps[_FAMILY_COLOURS.get(family, "Greys")]
        for i, name in enumerate(names):
            colours[name] = cmap(0.85 - 0.5 * i / max(len(names), 1))
    return colours


def write_plots(results: BenchResults, out: Path) -> list[Path]:
    """Write the PNG plots of whatever was measured; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    workloads = [info.name for info in results.workloads]
    routers = [row_label(r, e) for e in results.engine_sets for r in results.routers]
    colours = _colours(routers + [g.router for g in (results.overhead.gateways if results.overhead else ())])

    if workloads and routers:
        fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4.5), squeeze=False)
        for ax, name in zip(axes[0], workloads):
            runs = [r for r in rows(results, name) if r.summary is not None]
            xs = range(len(runs))
            ax.bar(xs, [r.summary.hit_rate for r in runs], color=[colours[r.label] for r in runs])
            ax.scatter(
                xs, [r.summary.hit_rate_bound for r in runs], marker="_", s=400, color="black", label="trace bound"
            )
            ax.set_xticks(list(xs), [r.label for r in runs], rotation=60, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_title(name)
            ax.set_ylabel("engine-reported prefix hit rate")
            ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        written.append(out / "hit_rate.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4.5), squeeze=False)
        for ax, name in zip(axes[0], workloads):
            runs = [r for r in rows(results, name) if r.summary is not None]
            xs = list(range(len(runs)))
            width = 0.4
            ax.bar([x - width / 2 for x in xs], [r.summary.ttft_ms_p50 for r in runs], width, label="p50",
                   color=[colours[r.label] for r in runs])  # fmt: skip
            ax.bar([x + width / 2 for x in xs], [r.summary.ttft_ms_p90 for r in runs], width, label="p90",
                   color=[colours[r.label] for r in runs], alpha=0.45, hatch="//")  # fmt: skip
            ax.set_xticks(xs, [r.label for r in runs], rotation=60, ha="right", fontsize=8)
            ax.set_title(name)
            ax.set_ylabel("TTFT (ms)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "ttft.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    fair = [info for info in results.workloads if info.duration_s is not None]
    if fair and routers:
        runs = [r for r in rows(results, fair[0].name) if r.summary is not None and r.summary.light_share is not None]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs) + 2), 4.5))
        xs = list(range(len(runs)))
        heavy = [1 - (r.summary.light_share or 0.0) for r in runs]
        light = [r.summary.light_share or 0.0 for r in runs]
        ax.bar(xs, heavy, color="tab:red", alpha=0.7, label="heavy user")
        ax.bar(xs, light, bottom=heavy, color="tab:blue", alpha=0.7, label="light users")
        for x, r in zip(xs, runs):
            ax.text(x, 1.01, f"J={r.summary.jain_index:.2f}", ha="center", fontsize=7)
        if runs and runs[0].summary.light_share_fair is not None:
            ax.axhline(
                1 - runs[0].summary.light_share_fair, color="black", ls="--", lw=1, label="heavy user's equal share"
            )
            floors = [r.summary.light_share_vtc_floor or 0.0 for r in runs]
            ax.axhline(1 - min(floors), color="black", ls=":", lw=1, label="most the heavy user gets under VTC")
        ax.set_xticks(xs, [r.label for r in runs], rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("share of service (1 x in + 2 x out tokens)")
        ax.set_title(f"{fair[0].name}: who got served")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        written.append(out / "fairness.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    overhead = results.overhead
    if overhead is not None and overhead.gateways:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        names = [g.router for g in overhead.gateways]
        xs = list(range(len(names)))
        width = 0.4
        left.bar([x - width / 2 for x in xs], [g.added_ms_p50 for g in overhead.gateways], width, label="p50",
                 color=[colours[n] for n in names])  # fmt: skip
        left.bar([x + width / 2 for x in xs], [g.added_ms_p99 for g in overhead.gateways], width, label="p99",
                 color=[colours[n] for n in names], alpha=0.45, hatch="//")  # fmt: skip
        left.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
        left.set_ylabel("latency added per request (ms)")
        left.legend(fontsize=8)
        for g in overhead.gateways:
            right.plot([p.concurrency for p in g.curve], [p.rps for p in g.curve], marker="o", label=g.router,
                       color=colours[g.router])  # fmt: skip
        right.plot([p.concurrency for p in overhead.stub_curve], [p.rps for p in overhead.stub_curve], ls="--",
                   color="grey", label="stub direct (ceiling)")  # fmt: skip
        right.set_xscale("log", base=2)
        right.set_xlabel("closed-loop clients")
        right.set_ylabel("requests/s")
        right.set_title("sustained rate, gateway on one core")
        right.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "overhead.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
