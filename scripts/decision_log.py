"""Where a gateway's prompts went against where their prefixes were cached, from its decision log.

    kvgate serve ... --decision-log decisions.jsonl
    python scripts/decision_log.py decisions.jsonl

Prints how many requests were placed on the pod holding their longest cached
prefix, how many were sent to a pod holding less (the cost outweighed the
match: a busy holder, or a full one), how many found nothing cached anywhere
(a new prompt, or a prefix evicted from every pod), how often a request
waited for a pod at its adaptive limit, and over how many pods each user's
requests went (`router.decisions.summarize_log`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router.decisions import summarize_log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("log", type=Path, help="a decision log (kvgate serve --decision-log)")
    args = parser.parse_args()
    try:
        with args.log.open(encoding="utf-8") as lines:
            summary = summarize_log(lines)
    except (OSError, ValueError) as exc:
        print(f"{args.log}: {exc}", file=sys.stderr)
        return 1
    placed = max(summary.placed, 1)
    print(f"placed {summary.placed}, waited for a pod at its limit {summary.waits} times")
    print(f"  at the longest cached match: {summary.at_longest} ({summary.at_longest / placed:.0%})")
    print(
        f"  sent away from a longer match: {summary.sent_away} ({summary.sent_away / placed:.0%}), "
        f"{summary.blocks_given_up} blocks left behind"
    )
    print(f"  nothing cached on any pod: {summary.nothing_cached} ({summary.nothing_cached / placed:.0%})")
    print(f"pods per user: {summary.pods_per_user:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
