"""The `kvgate` command: one sub-command per component, each parsed by its owner.

Sub-commands are resolved lazily by name, so `kvgate serve` never imports vLLM
and `kvgate cache-node` never imports the gateway.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: sub-command -> (module, one-line help). Each module has `main(argv) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("router.server", "run the gateway in front of vLLM pods"),
    "up": ("kvgate.cluster", "start a local cluster: vLLM CPU engines, cache tiers and the gateway"),
    "bench": ("kvgate.bench", "side-by-side benchmark of kvgate and other routers"),
    "cache-node": ("kvcache.node", "run an L2 KV cache node (gRPC)"),
    "build-model": ("kvgate.model", "build the tiny local model directory"),
    "operator": ("operators.cli", "run the Kubernetes operator (CRDs KVCache, EnginePool, KVGateway)"),
}


def _usage() -> str:
    lines = ["usage: kvgate COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a sub-command.

    Args:
        argv: arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        The sub-command's exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"kvgate: unknown command {name!r}; commands: {', '.join(COMMANDS)} (see kvgate --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
