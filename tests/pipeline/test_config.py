"""Configuration is a user-facing feature: a mail admin edits YAML and runs ``check-config``.

Every mistake in a file must be reported at once, each as ``FILE:LINE: key.path: message``,
and never as a traceback; ``run`` refuses the same file.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gatewayd import config as config_module
from gatewayd.config import Config, Endpoint, parse_endpoint
from gatewayd.errors import ConfigError
from gatewayd.units import DAYS, HOURS, KB, MB, MINUTES, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "gatewayd.yaml"

VALID = textwrap.dedent("""\
    hostname: gw.example.test
    listeners:
      - {protocol: smtp, address: "127.0.0.1:2525"}
      - {protocol: lmtp, address: "unix:/run/gatewayd/lmtp.sock", name: lmtp-socket}
    store: {path: var/test.sqlite3}
    support:
      addresses: [support@example.test]
      reply_secret: "a-long-enough-secret"
    relay:
      address: "127.0.0.1:2526"
      retry: {first: 30s, max: 1h, give_up: 2d}
    teams:
      - {name: support, supervisor: lead@example.test}
    agents:
      - {name: alice, address: alice@agents.example.test, teams: [support]}
    routing:
      - plugin: round_robin
    fallback: {team: support}
    """)

# One file, many mistakes. Each marked line is where its error must be reported.
BROKEN = textwrap.dedent("""\
    hostname: gw.example.test
    listeners:
      - {protocol: smtp, address: "127.0.0.1:notaport"}
      - {protocol: lmtp, address: "127.0.0.1:2424", colour: blue}
      - {address: "127.0.0.1:2626"}
    store: {path: var/test.sqlite3}
    support:
      addresses: [support@example.test]
      reply_secret: "a-long-enough-secret"
    relay:
      address: "127.0.0.1:2526"
      retry: {first: 5 minutes}
    teams:
      - {name: support, supervisor: lead@example.test}
    agents:
      - {name: alice, address: alice@agents.example.test, teams: [support]}
      - {name: bob, address: bob@agents.example.test, teams: [sales]}
    sla:
      ack: 10m
      ack: 20m
    fallback: {team: support}
    """)

BROKEN_ERRORS = [
    (3, "listeners[0].address: port 'notaport' is not a number"),
    (4, "listeners[1].colour: unknown key"),
    (5, "listeners[2].protocol: is required"),
    (12, "relay.retry.first: '5 minutes' is not a duration"),
    (17, "agents[1].teams: team 'sales' is not defined under teams"),
    (20, "sla.ack: duplicate key"),
]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def issues_of(text: str, name: str = "test.yaml") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_module.loads(text, name)
    return [str(issue) for issue in caught.value.issues]


def with_change(old: str, new: str, text: str = VALID) -> str:
    assert old in text
    return text.replace(old, new, 1)


# --------------------------------------------------------------------------- the shipped example


class TestShippedExample:
    def test_loads_into_a_config(self) -> None:
        config = config_module.load(SHIPPED)
        assert config.hostname == "gw.example.test"
        assert [listener.protocol for listener in config.listeners] == ["smtp", "lmtp"]
        assert config.support.addresses == ("support@example.test",)
        assert config.tickets.prefix == "SUP"
        assert [agent.name for agent in config.agents] == ["alice", "bob", "sam"]
        assert [entry.plugin for entry in config.routing] == ["rules", "sticky", "schedule", "capacity", "round_robin"]

    def test_check_config_exits_0(self) -> None:
        result = cli("check-config", "-c", "etc/gatewayd.yaml")
        assert result.returncode == 0, result.stderr
        assert "ok" in result.stdout
        assert result.stderr == ""

    def test_documents_the_default_limits(self) -> None:
        """The file says "These are the defaults": keep it true."""
        assert config_module.load(SHIPPED).limits == config_module.LimitsConfig()

    def test_shows_the_default_relay_concurrency_which_applies_when_the_key_is_left_out(self) -> None:
        text = SHIPPED.read_text()
        assert "  concurrency: 16\n" in text
        assert config_module.load(SHIPPED).relay.concurrency == config_module.RELAY_CONCURRENCY == 16
        omitted = config_module.loads(text.replace("  concurrency: 16\n", ""), "omitted.yaml", source=SHIPPED)
        assert omitted.relay.concurrency == 16


# --------------------------------------------------------------------------- error reporting


class TestEveryErrorIsReported:
    def test_each_error_names_file_line_and_key_path(self) -> None:
        issues = issues_of(BROKEN, "broken.yaml")
        for line, text in BROKEN_ERRORS:
            expected = f"broken.yaml:{line}: {text}"
            assert any(issue.startswith(expected) for issue in issues), (expected, issues)

    def test_nothing_but_the_real_mistakes_is_reported(self) -> None:
        assert len(issues_of(BROKEN)) == len(BROKEN_ERRORS)

    def test_check_config_lists_every_error_on_stderr_and_exits_1(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.yaml"
        path.write_text(BROKEN)
        result = cli("check-config", "-c", str(path))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        for line, text in BROKEN_ERRORS:
            assert f"{path}:{line}: {text}" in result.stderr
        assert f"{len(BROKEN_ERRORS)} errors" in result.stderr

    def test_run_refuses_the_same_file(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.yaml"
        path.write_text(BROKEN)
        result = cli("run", "-c", str(path))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert f"{path}:3: listeners[0].address: port 'notaport' is not a number" in result.stderr

    def test_yaml_syntax_error_names_its_line(self, tmp_path: Path) -> None:
        path = tmp_path / "syntax.yaml"
        path.write_text(with_change("  reply_secret: \"a-long-enough-secret\"\n",
                                    "  reply_secret: [unclosed\n"))
        result = cli("check-config", "-c", str(path))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert f"{path}:9: YAML syntax error" in result.stderr

    @pytest.mark.parametrize("value", [
        "!!python/object/apply:os.system [echo owned]",
        "!!int not-a-number",
        "!!binary '@@@'",
        "2001-02-30",
    ])
    def test_unusual_yaml_values_are_errors_not_tracebacks(self, tmp_path: Path, value: str) -> None:
        path = tmp_path / "odd.yaml"
        path.write_text(with_change("hostname: gw.example.test", f"hostname: {value}"))
        result = cli("check-config", "-c", str(path))
        assert "Traceback" not in result.stderr
        if value == "2001-02-30":
            assert result.returncode == 0, "a date-like host name is just text"
        else:
            assert result.returncode == 1
            assert result.stderr.startswith(f"{path}")

    def test_a_missing_top_level_section_is_reported_not_hung_on(self) -> None:
        """A required list absent from the file has no line of its own: the file's first line is named."""
        issues = issues_of(with_change("agents:\n  - {name: alice, address: alice@agents.example.test, "
                                       "teams: [support]}\n", ""))
        assert "test.yaml:1: agents: is required" in issues

    def test_recursive_aliases_are_not_followed_forever(self) -> None:
        issues = issues_of(with_change("hostname: gw.example.test", "hostname: &loop [*loop]"))
        assert any(issue.startswith("test.yaml:1: hostname: must be a string") for issue in issues)

    @pytest.mark.parametrize(("old", "new", "expected"), [
        ("  - {protocol: smtp, address: \"127.0.0.1:2525\"}", "  - {protocol: smtp}",
         "test.yaml:3: listeners[0].address: is required"),
        ("  - {protocol: smtp, address: \"127.0.0.1:2525\"}", "  - {protocol: pop3, address: \"127.0.0.1:2525\"}",
         "test.yaml:3: listeners[0].protocol: 'pop3' is not one of: smtp, lmtp"),
        ("  - {name: support, supervisor: lead@example.test}", "  - {name: support}",
         "test.yaml:13: teams[0].supervisor: is required"),
        ("  - {name: alice, address: alice@agents.example.test, teams: [support]}",
         "  - {address: alice@agents.example.test, teams: [support]}",
         "test.yaml:15: agents[0].name: is required"),
        ("  - plugin: round_robin", "  - {timeout: 2s}", "test.yaml:17: routing[0].plugin: is required"),
        ("reply_secret: \"a-long-enough-secret\"", "reply_secret: short",
         "test.yaml:8: support.reply_secret: must be at least 8 characters"),
        ("addresses: [support@example.test]", "addresses: [\"alice@example.org)<bob@example.org>\"]",
         "test.yaml:7: support.addresses[0]:"),
        ("fallback: {team: support}", "fallback: {team: sales}",
         "test.yaml:18: fallback.team: team 'sales' is not defined under teams"),
        ("store: {path: var/test.sqlite3}", "store: {path: var/test.sqlite3, size: 1}",
         "test.yaml:5: store.size: unknown key"),
        ("fallback: {team: support}", "fallback: {team: support}\nlimits: {max_line_length: 2000}",
         "test.yaml:19: limits.max_line_length: must be at most 998"),
        ("fallback: {team: support}", "fallback: {team: support}\nlimits: {max_header_size: lots}",
         "test.yaml:19: limits.max_header_size: 'lots' is not a size"),
        ("retry: {first: 30s, max: 1h, give_up: 2d}", "retry: {first: 2h, max: 1h}",
         "test.yaml:11: relay.retry.max: must not be shorter than relay.retry.first"),
        ("hostname: gw.example.test", "hostname: gw.example.test\nhostnam: typo.example.test",
         "test.yaml:2: hostnam: unknown key"),
        ("retry: {first: 30s, max: 1h, give_up: 2d}",
         "retry: {first: 30s, max: 1h, give_up: 2d}\n  ca_file: /etc/ssl/certs/ca-certificates.crt",
         "test.yaml:12: relay.ca_file: is only used with relay.starttls: true"),
        ("retry: {first: 30s, max: 1h, give_up: 2d}",
         "retry: {first: 30s, max: 1h, give_up: 2d}\n  starttls: true\n  ca_file: /nonexistent/ca.pem",
         "test.yaml:13: relay.ca_file: cannot load CA certificates from '/nonexistent/ca.pem'"),
    ])
    def test_single_mistakes(self, old: str, new: str, expected: str) -> None:
        issues = issues_of(with_change(old, new))
        assert any(issue.startswith(expected) for issue in issues), (expected, issues)

    def test_a_missing_item_key_is_an_error_not_a_silently_dropped_item(self) -> None:
        """An agent without a name used to vanish from the config without a word."""
        text = with_change("routing:", "  - {address: carol@agents.example.test, teams: [support]}\nrouting:")
        assert any("agents[1].name: is required" in issue for issue in issues_of(text))

    def test_an_empty_file_is_one_clear_error(self) -> None:
        assert issues_of("# nothing here\n") == ["test.yaml:1: the file is empty"]

    def test_the_top_level_must_be_a_mapping(self) -> None:
        assert issues_of("- a\n- b\n") == ["test.yaml:1: the top level must be a mapping of keys"]

    def test_an_unreadable_file_is_an_error_naming_it(self, tmp_path: Path) -> None:
        result = cli("check-config", "-c", str(tmp_path / "absent.yaml"))
        assert result.returncode == 1
        assert f"{tmp_path / 'absent.yaml'}: cannot read" in result.stderr
        assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- values


class TestValues:
    def test_valid_config_values(self) -> None:
        config = config_module.loads(VALID)
        assert config.listeners[0].name == "smtp"
        assert config.listeners[1].address == Endpoint(path="/run/gatewayd/lmtp.sock")
        assert config.relay.retry.first == 30
        assert config.relay.retry.give_up == 2 * DAYS
        assert config.support.bounce_address == "bounces@example.test"
        assert config.tickets.first_number == 1000
        assert config.fallback.team == "support"

    def test_retry_backoff_doubles_up_to_max(self) -> None:
        retry = config_module.loads(VALID).relay.retry
        assert [retry.delay(n) for n in (1, 2, 3)] == [30, 60, 120]
        assert retry.delay(20) == 1 * HOURS

    def test_config_objects_are_frozen(self) -> None:
        config = config_module.loads(VALID)
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.hostname = "other.example.test"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.limits.max_recipients = 5  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.agents[0].teams = ()  # type: ignore[misc]
        assert isinstance(config.listeners, tuple)
        assert isinstance(config.agents[0].teams, tuple)

    def test_plugin_options_are_read_only(self) -> None:
        config = config_module.loads(VALID.replace(
            "  - plugin: round_robin", "  - plugin: rules\n    rules: [{match: {subject: x}, team: support}]"))
        options = config.routing[0].options
        with pytest.raises(TypeError):
            options["rules"] = ()  # type: ignore[index]
        assert isinstance(options["rules"], tuple)
        with pytest.raises(TypeError):
            options["rules"][0]["team"] = "other"  # type: ignore[index]

    def test_every_config_class_is_a_frozen_dataclass(self) -> None:
        classes = [obj for obj in vars(config_module).values()
                   if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__]
        assert Config in classes
        for cls in classes:
            assert cls.__dataclass_params__.frozen, cls.__name__  # type: ignore[attr-defined]


class TestDurationsAndSizes:
    @pytest.mark.parametrize(("text", "seconds"), [
        ("30s", 30), ("15m", 15 * MINUTES), ("24h", 24 * HOURS), ("2d", 2 * DAYS), ("1w", 7 * DAYS),
        ("500ms", 0.5), ("1.5h", 1.5 * HOURS), (" 10 s ", 10), ("90", 90), (90, 90), (0.25, 0.25),
    ])
    def test_durations(self, text: object, seconds: float) -> None:
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", ["5 minutes", "-5s", "1y", "", "s", True, -1, "1h30m"])
    def test_bad_durations(self, text: object) -> None:
        with pytest.raises(ValueError):
            parse_duration(text)

    @pytest.mark.parametrize(("text", "size"), [
        ("100KB", 100 * KB), ("32MB", 32 * MB), ("32mb", 32 * MB), ("1g", 1024 * MB), ("512", 512),
        (1048576, MB), ("10 KiB", 10 * KB), ("7b", 7),
    ])
    def test_sizes(self, text: object, size: int) -> None:
        assert parse_size(text) == size

    @pytest.mark.parametrize("text", ["1.5MB", "lots", "-1", "10TB", False, -5, ""])
    def test_bad_sizes(self, text: object) -> None:
        with pytest.raises(ValueError):
            parse_size(text)

    def test_a_zero_duration_is_refused_where_it_must_be_positive(self) -> None:
        issues = issues_of(VALID.replace("retry: {first: 30s,", "retry: {first: 0s,"))
        assert any(issue.startswith("test.yaml:11: relay.retry.first: must be longer than 0s") for issue in issues)


class TestEndpoints:
    @pytest.mark.parametrize(("text", "endpoint"), [
        ("127.0.0.1:2525", Endpoint(host="127.0.0.1", port=2525)),
        ("[::1]:25", Endpoint(host="::1", port=25)),
        ("localhost:24", Endpoint(host="localhost", port=24)),
        (":25", Endpoint(host="0.0.0.0", port=25)),
        ("unix:/run/gatewayd/lmtp.sock", Endpoint(path="/run/gatewayd/lmtp.sock")),
        ("127.0.0.1:0", Endpoint(host="127.0.0.1", port=0)),
        ("127.0.0.1:65535", Endpoint(host="127.0.0.1", port=65535)),
    ])
    def test_parses(self, text: str, endpoint: Endpoint) -> None:
        assert parse_endpoint(text) == endpoint

    @pytest.mark.parametrize(("text", "message"), [
        ("127.0.0.1:notaport", "port 'notaport' is not a number"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
        ("127.0.0.1:-1", "is not a number"),
        ("127.0.0.1", "needs a port"),
        ("::1:25", "write IPv6 addresses as [addr]:port"),
        ("[::1]25", "is not [ipv6]:port"),
        ("[::1", "is not [ipv6]:port"),
        ("bad_host!:25", "is not an IP address or host name"),
        ("unix:", "needs a socket path"),
    ])
    def test_refuses(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=None) as caught:
            parse_endpoint(text)
        assert message in str(caught.value)

    def test_unix_sockets_only_where_allowed(self) -> None:
        with pytest.raises(ValueError, match="unix sockets are not supported here"):
            parse_endpoint("unix:/tmp/relay.sock", allow_unix=False)

    def test_relay_cannot_be_a_unix_socket(self) -> None:
        issues = issues_of(VALID.replace('address: "127.0.0.1:2526"', 'address: "unix:/tmp/relay.sock"'))
        assert any(issue.startswith("test.yaml:10: relay.address:") for issue in issues)

    @pytest.mark.parametrize(("text", "shown"), [
        ("127.0.0.1:2525", "127.0.0.1:2525"), ("[::1]:25", "[::1]:25"), ("unix:/x.sock", "unix:/x.sock")])
    def test_prints_as_written(self, text: str, shown: str) -> None:
        assert str(parse_endpoint(text)) == shown
