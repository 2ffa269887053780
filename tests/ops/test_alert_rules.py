"""The shipped Prometheus alert rules: valid, and each alert proven to fire and to resolve by promtool.

``make test`` installs promtool (Debian's ``prometheus`` package) when it is
missing, so a missing promtool is a failure here, not a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.gateway import REPO

RULES = REPO / "etc" / "prometheus" / "gatewayd-alerts.yml"
RULE_TESTS = REPO / "etc" / "prometheus" / "gatewayd-alerts.test.yml"
REQUIRED = {"GatewaydDown", "GatewaydNoMailReceived", "GatewaydTicketsOverdue", "GatewaydOutboxBacklogGrowing",
            "GatewaydOutboxOldestTooOld", "GatewaydDeliveryFailures", "GatewaydPluginErrors"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make test-deps` installs it (Debian package prometheus)")
    return subprocess.run(["promtool", *args], check=False, cwd=RULES.parent, capture_output=True, text=True, timeout=120)


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_passes() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_issue_s_alerts_are_all_there() -> None:
    assert REQUIRED <= set(alert_names())
    assert len(alert_names()) == len(set(alert_names()))


@pytest.mark.parametrize("alert", alert_names())
def test_each_alert_is_tested_firing_and_then_resolved(alert: str) -> None:
    """promtool only checks what the test file asks; this makes sure it asks both questions of every alert."""
    suite = yaml.safe_load(RULE_TESTS.read_text())
    assert suite["rule_files"] == [RULES.name]
    for case in suite["tests"]:
        checks = sorted((_minutes(c["eval_time"]), bool(c["exp_alerts"]))
                        for c in case.get("alert_rule_test", []) if c["alertname"] == alert)
        fired = [t for t, firing in checks if firing]
        if fired and any(not firing and t > fired[0] for t, firing in checks) \
                and any(not firing and t < fired[0] for t, firing in checks):
            return
    pytest.fail(f"{alert}: no test case shows it quiet, then firing, then resolved")


def _minutes(duration: str) -> float:
    units = {"s": 1 / 60, "m": 1, "h": 60, "d": 1440, "w": 10080}
    return float(duration[:-1]) * units[duration[-1]]


def test_alerts_carry_severity_and_an_actionable_description() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 40, rule["alert"]


def test_rules_reference_the_scrape_job_the_admin_guide_configures() -> None:
    guide = (REPO / "docs" / "admin-guide.md").read_text()
    assert 'job_name: gatewayd' in guide
    assert 'job="gatewayd"' in RULES.read_text()


def test_rule_file_path_is_what_the_guide_installs() -> None:
    assert Path("etc/prometheus/gatewayd-alerts.yml").as_posix() in (REPO / "docs" / "admin-guide.md").read_text()
