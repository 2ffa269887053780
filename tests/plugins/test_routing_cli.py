"""route --explain and agents list|away|back against a real store in a temporary directory."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from pathlib import Path

import pytest

from gatewayd import routing_cli
from gatewayd.config import loads
from gatewayd.store import Store
from tests.plugins.routing_fixtures import BASE_CONFIG

ROUTING = """\
routing:
  - plugin: rules
    rules:
      - match: {subject: "(?i)phishing|fraud"}
        team: security
        priority: high
  - plugin: round_robin
"""

PHISHING = b"From: Zoe <zoe@example.org>\r\nSubject: Phishing attempt\r\n\r\nPlease look.\r\n"


@pytest.fixture
def config(tmp_path: Path):
    text = BASE_CONFIG + ROUTING + f"store: {{path: {tmp_path / 'gw.sqlite3'}}}\n"
    return loads(text, str(tmp_path / "gatewayd.yaml"), tmp_path / "gatewayd.yaml")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config")
    routing_cli.add_parsers(parser.add_subparsers(dest="command"), common)
    return parser.parse_args(argv)


def run(config, *argv: str) -> str:
    args = parse(*argv)
    out = io.StringIO()
    assert args.handler(args, config, out) == 0
    return out.getvalue()


def store_call(config, method: str, *call_args):
    async def go():
        store = await Store.open(config.store.path)
        try:
            return await getattr(store, method)(*call_args)
        finally:
            await store.close()
    return asyncio.run(go())


def test_explain_without_a_store_creates_nothing(config, tmp_path: Path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(PHISHING)
    text = run(config, "route", "--explain", str(eml), "-c", "x")
    assert "1. rules" in text and "narrow" in text and "rule 1 matched (subject)" in text
    assert "Result: sam (team security, priority high), decided by round_robin" in text
    assert not config.store.path.exists()


def test_explain_json_reads_state_and_writes_none(config, tmp_path: Path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(PHISHING.replace(b"Phishing attempt", b"Login problem"))
    store_call(config, "plugin_state_set", "round_robin", "last:support", "alice")
    store_call(config, "set_agent_away", "bob", True, "holiday")
    payload = json.loads(run(config, "route", "--explain", str(eml), "--json"))
    assert payload["agent"] == "carol" and payload["dry_run"] is True
    assert [s["plugin"] for s in payload["trace"]] == ["rules", "round_robin"]
    assert payload["message"]["sender"] == "zoe@example.org"
    assert store_call(config, "plugin_state_get", "round_robin", "last:support") == "alice"


def test_agents_away_back_and_list(config):
    assert "bob is away" in run(config, "agents", "away", "bob", "--reason", "parental leave")
    table = run(config, "agents", "list")
    assert table.splitlines()[0].split() == ["NAME", "TEAMS", "STATUS", "OPEN", "ADDRESS"]
    assert "away (parental leave)" in next(line for line in table.splitlines() if line.startswith("bob"))
    run(config, "agents", "back", "bob")
    rows = json.loads(run(config, "agents", "list", "--json"))
    assert {r["name"]: r["away"] for r in rows} == {"alice": False, "bob": False, "carol": False, "sam": False}


def test_unknown_agent_is_refused(config, capsys):
    args = parse("agents", "away", "bobby")
    assert args.handler(args, config) == 1
    assert "no agent named 'bobby'" in capsys.readouterr().err
