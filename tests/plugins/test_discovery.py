"""load_chain: finding plugins, and config errors that name routing[i] and its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gatewayd.discovery import load_chain
from gatewayd.errors import ConfigError
from gatewayd.testing import MemoryStateStore, RecordingObserver, make_agents, make_message, make_ticket
from tests.plugins.routing_fixtures import BASE_CONFIG, make_config

ROUTING_LINE = BASE_CONFIG.count("\n") + 2


def issues_of(routing: str, extra: str = "") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_chain(make_config(routing, extra))
    return [str(issue) for issue in caught.value.issues]


def test_unknown_plugin_names_the_entry_and_line():
    issues = issues_of("""\
        - plugin: rules
          rules: [{match: {subject: x}, priority: high}]
        - plugin: round_robbin
        """)
    assert len(issues) == 1
    assert issues[0].startswith(f"gatewayd.yaml:{ROUTING_LINE + 2}: routing[1].plugin: unknown plugin 'round_robbin'")
    assert "round_robin" in issues[0]


def test_every_bad_entry_is_reported_with_option_lines():
    issues = issues_of("""\
        - plugin: capacity
          max_open: lots
        - plugin: rules
          rules:
            - match: {subject: "(unclosed"}
              team: securty
        - plugin: least_loaded
          colour: blue
        """)
    assert issues[0] == f"gatewayd.yaml:{ROUTING_LINE + 1}: routing[0].max_open: must be a whole number, not 'lots'"
    assert any(i.startswith(f"gatewayd.yaml:{ROUTING_LINE + 3}: routing[1].rules[0].match.subject: "
                            "invalid regular expression '(unclosed'") for i in issues)
    assert any("routing[1].rules[0].team: team 'securty' is not defined" in i for i in issues)
    assert issues[-1] == (f"gatewayd.yaml:{ROUTING_LINE + 7}: routing[2].colour: unknown option "
                          "(this plugin takes no options)")


def test_same_plugin_twice_needs_distinct_names():
    issues = issues_of("""\
        - plugin: least_loaded
        - plugin: least_loaded
        """)
    assert issues == [f"gatewayd.yaml:{ROUTING_LINE + 1}: routing[1]: 'least_loaded' is already used by "
                      "routing[0]; give one of the entries a distinct name: (e.g. name: least_loaded_2)"]
    chain = load_chain(make_config("""\
        - plugin: least_loaded
        - {plugin: least_loaded, name: least_loaded_again, timeout: 250ms}
        """))
    assert [(link.name, link.timeout) for link in chain.links] == [("least_loaded", 1.0),
                                                                   ("least_loaded_again", 0.25)]


def write_plugin(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


LOCAL_PLUGIN = """\
    from gatewayd.plugin import API_VERSION, Decision, Plugin

    class Greeter(Plugin):
        api_version = API_VERSION

        def __init__(self, options):
            self.agent = options.get_str("agent")

        def route(self, context, ticket, message, candidates):
            return Decision.pick(self.agent, "local plugin says so")

    plugin = Greeter
    """


async def test_plugin_directory_module(tmp_path: Path):
    write_plugin(tmp_path / "local", "greeter", LOCAL_PLUGIN)
    observer = RecordingObserver()
    chain = load_chain(make_config("- {plugin: greeter, agent: carol}\n",
                                   f"plugin_paths: [{tmp_path / 'local'}]\n"), observer)
    result = await chain.route(make_ticket(), make_message(), make_agents("alice", "carol"), MemoryStateStore())
    assert result.agent == "carol" and observer.decisions == [("greeter", "carol")]


def test_plugin_directory_relative_to_config_file(tmp_path: Path):
    write_plugin(tmp_path / "myplugins", "greeter", LOCAL_PLUGIN)
    config_file = tmp_path / "gatewayd.yaml"
    config_file.write_text(make_config_text("- {plugin: greeter, agent: carol}\n", "plugin_paths: [myplugins]\n"))
    from gatewayd.config import load
    chain = load_chain(load(config_file))
    assert chain.links[0].name == "greeter"


def make_config_text(routing: str, extra: str) -> str:
    return BASE_CONFIG + "routing:\n" + textwrap.indent(routing, "  ") + extra


def test_one_name_in_two_places_is_an_error(tmp_path: Path):
    write_plugin(tmp_path / "a", "greeter", LOCAL_PLUGIN)
    write_plugin(tmp_path / "b", "greeter", LOCAL_PLUGIN)
    write_plugin(tmp_path / "a", "round_robin", LOCAL_PLUGIN)
    issues = issues_of("- {plugin: greeter, agent: bob}\n- plugin: round_robin\n",
                       f"plugin_paths: [{tmp_path / 'a'}, {tmp_path / 'b'}]\n")
    assert len(issues) == 2
    assert "routing[0].plugin: plugin 'greeter' is provided by both" in issues[0]
    assert "routing[1].plugin: plugin 'round_robin' is provided by both entry point" in issues[1]


def test_repo_plugins_folder_and_entry_point_count_once():
    repo_plugins = Path(__file__).resolve().parents[2] / "plugins"
    chain = load_chain(make_config("- plugin: round_robin\n", f"plugin_paths: [{repo_plugins}]\n"))
    assert type(chain.links[0].plugin).__module__ == "gatewayd_plugins.round_robin"


def test_api_version_mismatch_and_missing_plugin_attribute(tmp_path: Path):
    write_plugin(tmp_path, "future", """\
        from gatewayd.plugin import Plugin
        class Future(Plugin):
            api_version = 99
            def route(self, context, ticket, message, candidates):
                return None
        plugin = Future
        """)
    write_plugin(tmp_path, "bare", "x = 1\n")
    write_plugin(tmp_path, "broken", "import nonexistent_module_for_gatewayd\n")
    issues = issues_of("- plugin: future\n- plugin: bare\n- plugin: broken\n", f"plugin_paths: [{tmp_path}]\n")
    assert "routing[0].plugin: plugin 'future': Future targets plugin API version 99" in issues[0]
    assert "routing[1].plugin: plugin 'bare'" in issues[1] and "plugin = YourPluginClass" in issues[1]
    assert "routing[2].plugin: plugin 'broken'" in issues[2] and "ModuleNotFoundError" in issues[2]


def test_constructor_crash_is_a_config_error(tmp_path: Path):
    write_plugin(tmp_path, "crashy", """\
        from gatewayd.plugin import Plugin
        class Crashy(Plugin):
            def __init__(self, options):
                raise RuntimeError("cannot reach CRM")
            def route(self, context, ticket, message, candidates):
                return None
        plugin = Crashy
        """)
    issues = issues_of("- plugin: crashy\n", f"plugin_paths: [{tmp_path}]\n")
    assert issues == [f"gatewayd.yaml:{ROUTING_LINE}: routing[0]: plugin 'crashy' failed to start: "
                      "RuntimeError: cannot reach CRM"]


async def test_empty_chain_uses_fallback():
    chain = load_chain(make_config("[]\n"))
    agents = make_agents("alice", "bob")
    result = await chain.route(make_ticket(), make_message(), agents, MemoryStateStore())
    assert result.agent == "alice" and result.team == "support"
