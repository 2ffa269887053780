"""The example third-party plugin, installed into the running environment and used by name.

The session fixture runs ``pip install --no-deps --no-build-isolation`` on a copy
of ``examples/vip_router`` (a copy, so the build leaves no clutter in the repo),
which registers its ``gatewayd.plugins`` entry point in the current venv; a
temporary venv per run would be too slow.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.discovery import load_chain
from gatewayd.errors import ConfigError
from gatewayd.testing import MemoryStateStore, make_agent, make_message, make_ticket, run_chain
from tests.plugins.routing_fixtures import make_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vip_router"


@pytest.fixture(scope="session")
def vip_router_installed(tmp_path_factory: pytest.TempPathFactory) -> None:
    source = tmp_path_factory.mktemp("vip") / "vip_router"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, f"pip install failed:\n{completed.stdout}\n{completed.stderr}"
    importlib.invalidate_caches()


AGENTS = (make_agent("alice"), make_agent("bob"), make_agent("sam", teams=("security",)))


def test_entry_point_is_registered(vip_router_installed):
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="gatewayd.plugins")}
    assert names["vip_router"] == "gatewayd_vip_router:VipRouter"


async def test_vip_sender_goes_to_reserved_agent_through_load_chain(vip_router_installed):
    chain = load_chain(make_config("""\
        - plugin: vip_router
          domains: [bigcorp.example]
          agent: bob
          priority: high
        - plugin: round_robin
        """))
    state = MemoryStateStore()
    vip = await chain.route(make_ticket(), make_message(sender="ceo@eu.bigcorp.example"), AGENTS, state)
    assert (vip.agent, vip.priority, vip.decided_by) == ("bob", "high", "vip_router")
    other = await chain.route(make_ticket(), make_message(sender="x@smallshop.example"), AGENTS, state)
    assert other.decided_by == "round_robin" and other.trace[0].reason == "not a VIP sender"


async def test_vip_falls_back_to_team_when_agent_away(vip_router_installed):
    from gatewayd_vip_router import VipRouter

    agents = (make_agent("alice"), make_agent("bob", away=True), make_agent("sam", teams=("security",)))
    result, trace = await run_chain([(VipRouter, {"domains": ["bigcorp.example"], "agent": "bob",
                                                  "team": "security"})],
                                    agents=agents, message=make_message(sender="cfo@bigcorp.example"))
    assert result.agent == "sam" and trace[0].outcome == "narrow"


def test_vip_options_are_validated(vip_router_installed):
    with pytest.raises(ConfigError) as caught:
        load_chain(make_config("- {plugin: vip_router, domains: [], agent: bobby}\n"))
    messages = [str(i) for i in caught.value.issues]
    assert any("routing[0].domains: needs at least one domain" in m for m in messages)
    assert any("routing[0].agent: agent 'bobby' is not defined" in m for m in messages)
