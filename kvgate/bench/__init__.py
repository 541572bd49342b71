"""`kvgate bench`: kvgate and the routers users would pick instead, side by side on the same engines.

One run starts N real vLLM CPU engines on the tiny local model, then puts each
router in front of them in turn (kvgate with each policy, SGLang's router,
vllm-router), resetting the engines' prefix caches between runs, and replays
the same seeded workloads to every router. It also measures each gateway on
its own, in front of a stub engine that answers at once. Results go to a
folder as JSON, a Markdown table and PNG plots.

Modules, in the order a run uses them:

- `config`: the sizes of a full and a `--quick` run;
- `workloads` (with `sharegpt` and `text`): the seeded request traces;
- `fleet` (with `event_relay`): the engines, their counters and prefix-cache resets;
- `routers`: how each router is launched, checked and stopped;
- `load`: the closed-loop client that replays a workload and times it;
- `bound`: the hit-rate upper bound a trace allows;
- `stats`: percentiles, Jain's index, the VTC floor;
- `cpu`: who used the cores during a run (the router, the engines, others);
- `summary`: one run's records and counters turned into figures;
- `overhead`: the gateways against the stub engine;
- `aggregate`: one row per router, medians over `--repeat` runs;
- `report`: JSON, Markdown and plots;
- `runner` and `cli`: the orchestration and the command line.

Only the command line is imported here, lazily, so `import kvgate.bench` is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run `kvgate bench` with `argv` (the arguments after `bench`).

    Args:
        argv: command-line arguments; `sys.argv[2:]` semantics are the caller's.

    Returns:
        The exit status: 0 when every router ran and every figure was produced.
    """
    from kvgate.bench.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
