"""How one gateway's routing work grows with the fleet: decision time, KV event ingestion, index memory.

    python scripts/bench_fleet.py [--quick] [--out DIR] [--sizes 10,100,1000,10000] [--seed N]

The same measurement as `kvgate bench --fleet-sim` (see `kvgate.bench.fleet_size`),
with the fleet sizes selectable. Writes fleet-size.{json,md,png} to the folder
(default results/fleet-<UTC timestamp>) and prints one line per size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
from pathlib import Path

from kvgate.bench.fleet_size import FleetSimSettings, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decisions and events (about a minute)")
    parser.add_argument("--out", type=Path, help="results folder")
    parser.add_argument("--sizes", help="comma-separated fleet sizes in pods (default 10,100,1000,10000)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    settings = FleetSimSettings.quick() if args.quick else FleetSimSettings()
    settings = dataclasses.replace(settings, seed=args.seed)
    if args.sizes:
        settings = dataclasses.replace(settings, sizes=tuple(int(n) for n in args.sizes.split(",")))
    out = args.out or Path("results") / f"fleet-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    run(settings, out)
    print(f"figures in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
