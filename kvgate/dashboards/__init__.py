"""kvgate's Grafana dashboards and Prometheus alert rules, generated from code.

`BOARDS` maps each dashboard's file name to its builder; `python -m
kvgate.dashboards` writes them to ``config/dashboards/`` and the alert rules
to ``config/prometheus/``, where they are committed so users import them
without running code (``--check`` fails when the committed files are stale).

Not here: the gateway's own live page (`router.dashboard`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvgate.dashboards import fleet, kvcache, routing

#: File name -> builder of the dashboard's JSON.
BOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "fleet.json": fleet.build,
    "routing.json": routing.build,
    "kvcache.json": kvcache.build,
}
