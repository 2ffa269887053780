"""Config builders shared by the routing-plugin tests (a plain module, so tests can import it)."""

from __future__ import annotations

import textwrap

from gatewayd.config import Config, loads

BASE_CONFIG = """\
hostname: gw.example.test
listeners:
  - {protocol: smtp, address: "127.0.0.1:2525"}
support:
  addresses: [support@example.test]
  reply_secret: "change-me-please"
relay: {address: "127.0.0.1:2526"}
teams:
  - {name: support, supervisor: lead@example.test}
  - {name: security, supervisor: ciso@example.test}
agents:
  - {name: alice, address: alice@agents.example.test, teams: [support]}
  - {name: bob,   address: bob@agents.example.test,   teams: [support]}
  - {name: carol, address: carol@agents.example.test, teams: [support]}
  - {name: sam,   address: sam@agents.example.test,   teams: [security]}
fallback: {team: support}
"""


def make_config(routing_yaml: str, extra: str = "") -> Config:
    """BASE_CONFIG plus a ``routing:`` block (given without indentation) and extra top-level keys."""
    routing = "routing:\n" + textwrap.indent(textwrap.dedent(routing_yaml), "  ")
    return loads(BASE_CONFIG + routing + textwrap.dedent(extra), "gatewayd.yaml")

