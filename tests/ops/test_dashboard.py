"""The Grafana dashboard and the alert rules name only metrics a running gatewayd exports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from tests.ops.helpers import base_name, scrape
from tests.support.gateway import REPO, free_port

DASHBOARD = REPO / "etc" / "grafana" / "gatewayd-dashboard.json"
RULES = REPO / "etc" / "prometheus" / "gatewayd-alerts.yml"
# Series Prometheus itself attaches to every scrape target.
SYNTHETIC = {"up"}

_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) selects."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _LABEL_LISTS.sub("", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    found = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)\s*(\()?", expr):
        if match.group(2) is None and match.group(1) not in _KEYWORDS:
            found.add(match.group(1))
    return found


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (le, team) (rate(a_bucket{team=~"$team"}[$__rate_interval]))', {"a_bucket"}),
    ("histogram_quantile(0.9, sum(rate(b_bucket[1h])) by (le))", {"b_bucket"}),
    ('sum(increase(c_total{x="by (y)"}[2h] offset 1w)) >= 5 and on (job) d == 0', {"c_total", "d"}),
    ("e / ignoring(kind) group_left f > 0.5 or vector(1)", {"e", "f"}),
])
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> Iterator[str]:
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert match, query
            yield match.group(1)


def rule_exprs() -> Iterator[str]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]


async def test_dashboard_and_rules_reference_only_exported_metrics(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    await gateway_factory(metrics_port=port)
    exported = (await scrape(port)).names()
    known = {base_name(n) for n in exported} | exported | SYNTHETIC
    for source, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        for expr in exprs:
            unknown = metric_names(expr) - known
            assert not unknown, f"{source} names metrics gatewayd does not export: {unknown} in {expr}"


async def test_dashboard_shows_every_gatewayd_metric(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    await gateway_factory(metrics_port=port)
    ours = {base_name(n) for n in (await scrape(port)).names() if n.startswith("gatewayd_")}
    ours = {n for n in ours if not n.endswith("_created")}
    shown = {base_name(n) for expr in dashboard_exprs() for n in metric_names(expr)}
    assert ours - shown == set()


def test_dashboard_has_datasource_team_and_agent_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("team", "agent"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*", "All must match the empty agent of unassigned tickets"
    assert "$team" in variables["agent"]["query"]["query"]


def test_every_panel_uses_the_datasource_variable() -> None:
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_ticket_panels_follow_the_team_and_agent_selection() -> None:
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            if re.search(r"gatewayd_tickets_(open|overdue)\b", target["expr"]):
                assert 'team=~"$team"' in target["expr"] and 'agent=~"$agent"' in target["expr"], panel["title"]
            if re.search(r"gatewayd_(tickets_created|ack_seconds|first_response_seconds)", target["expr"]):
                assert 'team=~"$team"' in target["expr"], panel["title"]


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, p["title"]
        assert g["x"] + g["w"] <= 24
        cells |= mine
