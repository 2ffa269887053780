"""docs/metrics.md lists exactly the metrics a running gatewayd exports, with their labels."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tests.ops.helpers import base_name, scrape
from tests.support.gateway import REPO, free_port

METRICS_DOC = REPO / "docs" / "metrics.md"


def documented() -> dict[str, set[str]]:
    """Metric name -> labels, from the tables' rows."""
    rows = {}
    for line in METRICS_DOC.read_text().splitlines():
        match = re.match(r"\| `(gatewayd_\w+)` \| (\w+) \|([^|]*)\|", line)
        if match:
            rows[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(3)))
    return rows


async def test_metrics_doc_matches_the_exposition(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    await gateway_factory(metrics_port=port)
    result = await scrape(port)
    exported: dict[str, set[str]] = {}
    for name, labels in result.samples:
        if name.startswith("gatewayd_") and not name.endswith("_created"):
            exported.setdefault(base_name(name), set()).update(k for k, _ in labels if k != "le")
    assert set(documented()) == set(exported)
    for name, labels in documented().items():
        assert labels == exported[name], name


def test_every_shipped_alert_is_explained() -> None:
    rules = (REPO / "etc" / "prometheus" / "gatewayd-alerts.yml").read_text()
    for alert in re.findall(r"- alert: (\w+)", rules):
        assert f"| `{alert}` |" in METRICS_DOC.read_text(), alert
