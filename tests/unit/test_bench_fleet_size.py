"""The fleet-size section of the benchmark: it runs the real router, index and event path and writes its figures."""

from __future__ import annotations

import json
from pathlib import Path

from kvgate.bench.cli import build_parser
from kvgate.bench.fleet_size import FleetSimSettings, run


def test_a_small_simulation_writes_figures_table_and_plot(tmp_path: Path) -> None:
    settings = FleetSimSettings(
        sizes=(5, 40), decisions=60, full_scan_decisions=20, prefixes=20, event_batches=200, memory_blocks=2_000, rounds=2
    )
    lines: list[str] = []
    result = run(settings, tmp_path, log=lines.append)
    assert [s.pods for s in result.sizes] == [5, 40] and len(lines) == 2
    for size in result.sizes:
        assert 0 < size.decision_p50_us <= size.decision_p99_us
        assert size.decision_p99_low_us <= size.decision_p99_us <= size.decision_p99_high_us and size.decision_cpu_p99_us > 0
        assert 0 < size.full_scan_p50_us <= size.full_scan_p99_us
        assert size.events_per_s > 0 and size.blocks_per_s > size.events_per_s
        assert size.index_bytes_per_million_blocks > 0
    written = json.loads((tmp_path / "fleet-size.json").read_text())
    assert [s["pods"] for s in written["sizes"]] == [5, 40]
    assert (tmp_path / "fleet-size.md").read_text().count("\n") == 4
    assert (tmp_path / "fleet-size.png").stat().st_size > 10_000


def test_the_bench_command_has_a_fleet_sim_flag() -> None:
    assert build_parser().parse_args(["--fleet-sim", "--quick"]).fleet_sim
