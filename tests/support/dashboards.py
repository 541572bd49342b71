"""What the dashboard tests share: every query kvgate ships, and the metric names in it and on /metrics.

`shipped_queries()` lists every PromQL expression of the generated Grafana
dashboards and of the alert rules; `metric_names(expr)` parses one (with
`promql-parser`) and returns the metric names it selects; `exported_names`
reads a Prometheus text exposition into the series names a query could name.
"""

from __future__ import annotations

from typing import Any

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from kvgate.dashboards import BOARDS
from kvgate.dashboards.alerts import rules
from kvgate.dashboards.panels import panel_queries

#: Series Prometheus makes itself for every target.
PROMETHEUS_BUILTINS = frozenset({"up"})
#: Suffixes a family of each type is queried by.
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "summary": ("_count", "_sum")}


def substitute(expr: str, rate_window: str = "1m") -> str:
    """Fill Grafana's variables in the way an "All" selection does."""
    for name in ("$model", "$pod", "$cache_node"):
        expr = expr.replace(name, ".*")
    return expr.replace("$__rate_interval", rate_window)


def shipped_queries() -> list[tuple[str, str]]:
    """(where, expression) of every dashboard panel target and alert rule."""
    out = [(f"{name}: {title}", expr) for name, build in BOARDS.items() for title, expr in panel_queries(build())]
    for group in rules()["groups"]:
        out += [(f"rules: {rule['alert']}", rule["expr"]) for rule in group["rules"]]
    return out


def metric_names(expr: str) -> set[str]:
    """Names of every metric `expr` selects (raises ValueError if it does not parse)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if node is None:
            return
        if isinstance(node, list | tuple):
            for item in node:
                walk(item)
            return
        kind = type(node).__name__
        if kind == "VectorSelector":
            names.add(node.name)
            return
        for attr in ("lhs", "rhs", "expr", "vector_selector", "args", "param"):
            walk(getattr(node, attr, None))

    walk(promql_parser.parse(substitute(expr)))
    return names


def exported_names(text: str) -> set[str]:
    """Every series name a query can select from an exposition, including families with no series yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names
