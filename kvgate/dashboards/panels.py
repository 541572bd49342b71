"""Building blocks of kvgate's Grafana dashboards, over grafanalib.

Every dashboard is a list of rows; a row is a title and its panels; a panel
is a grafanalib `TimeSeries` or `Stat` whose targets are PromQL queries. The
helpers here fix what must be the same everywhere: the data source is the
``$datasource`` template variable, every dashboard has the variables
``model``, ``pod`` and ``cache_node``, panels are laid out three to a line,
and rates use Grafana's ``$__rate_interval``.

Callers: `kvgate.dashboards.fleet`, `.routing`, `.kvcache` (one function per
row) and `kvgate.dashboards.__main__`, which writes the JSON. Not here: the
queries themselves, or the alert rules (`kvgate.dashboards.alerts`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from grafanalib.core import (
    Dashboard,
    GridPos,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)
from grafanalib._gen import DashboardEncoder

#: The data source every panel and variable uses: a template variable, chosen on import.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Rate window: Grafana's own, at least four scrape intervals.
RATE = "$__rate_interval"
#: Label matchers of the template variables (regexes, so "All" is ".*").
MODEL = 'model_name=~"$model"'
POD = 'pod=~"$pod"'
CACHE_NODE = 'instance=~"$cache_node"'

_WIDTH = 24
_PER_LINE = 3
_HEIGHT = 8


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL query of a panel and how its series are named in the legend."""

    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    """A titled row of panels."""

    title: str
    panels: Sequence[TimeSeries | Stat]


def timeseries(title: str, *queries: Query, unit: str = "short", description: str = "", stack: bool = False) -> TimeSeries:
    """A time-series panel over `queries`.

    Args:
        title: panel title.
        queries: its PromQL queries.
        unit: Grafana unit id (``s``, ``percentunit``, ``Bps``, ``short``...).
        description: the panel's hover text: what it shows and how to read it.
        stack: stack the series (parts of a whole).
    """
    return TimeSeries(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=_targets(queries),
        unit=unit,
        stacking={"mode": "normal", "group": "A"} if stack else {},
        fillOpacity=30 if stack else 10,
        legendDisplayMode="table",
        legendCalcs=["lastNotNull", "max"],
    )


def stat(title: str, *queries: Query, unit: str = "short", description: str = "") -> Stat:
    """A single-figure panel (last value) over `queries`."""
    return Stat(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=_targets(queries),
        format=unit,
        reduceCalc="lastNotNull",
        graphMode="area",
    )


def _targets(queries: Sequence[Query]) -> list[Target]:
    return [
        Target(expr=q.expr, legendFormat=q.legend, refId=chr(ord("A") + i), datasource=DATASOURCE)
        for i, q in enumerate(queries)
    ]


def _query_variable(name: str, label: str, query: str) -> Template:
    return Template(
        name=name,
        label=label,
        query=query,
        dataSource=DATASOURCE,
        type="query",
        includeAll=True,
        multi=True,
        allValue=".*",
        default="$__all",
        refresh=2,  # on time range change: pods come and go
        sort=1,
    )


def variables() -> Templating:
    """The data source, model, pod and cache-node variables every dashboard carries."""
    return Templating(
        list=[
            Template(name="datasource", label="Data source", query="prometheus", type="datasource", default="Prometheus"),
            _query_variable("model", "Model", "label_values(vllm:num_requests_running, model_name)"),
            _query_variable("pod", "Pod", "label_values(kvgate_pod_healthy, pod)"),
            _query_variable("cache_node", "Cache node", "label_values(kvgate_kvcache_node_ring_members, instance)"),
        ]
    )


def dashboard(title: str, uid: str, description: str, rows: Sequence[Row]) -> dict[str, Any]:
    """The importable JSON (as a dict) of a dashboard made of `rows`.

    Panels are placed three to a line under their row; ids are assigned in order.
    """
    panels: list[Any] = []
    y = 0
    width = _WIDTH // _PER_LINE
    for row in rows:
        panels.append(RowPanel(title=row.title, gridPos=GridPos(h=1, w=_WIDTH, x=0, y=y)))
        y += 1
        for i, panel in enumerate(row.panels):
            if i and i % _PER_LINE == 0:
                y += _HEIGHT
            panel.gridPos = GridPos(h=_HEIGHT, w=width, x=(i % _PER_LINE) * width, y=y)
            panels.append(panel)
        y += _HEIGHT
    board = Dashboard(
        title=title,
        uid=uid,
        description=description,
        tags=["kvgate"],
        panels=panels,
        templating=variables(),
        time=Time("now-30m", "now"),
        refresh="10s",
        timezone="browser",
        schemaVersion=39,
    ).auto_panel_ids()
    exported = json.loads(json.dumps(board.to_json_data(), cls=DashboardEncoder))
    for variable in exported["templating"]["list"]:
        if variable.get("includeAll"):  # start on "All", in the shape Grafana saves it
            variable["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return exported


def panel_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel of an exported dashboard."""
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets") or []:
                if target.get("expr"):
                    yield inner["title"], target["expr"]
