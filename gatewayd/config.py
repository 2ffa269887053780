"""Configuration: YAML in, frozen dataclasses out, every error located by key path and line.

The loader never stops at the first problem: it collects every :class:`ConfigIssue`
and raises one :class:`ConfigError`, so ``gatewayd check-config`` can list them all.
Unknown keys are errors too, because a misspelt limit silently falling back to its
default is exactly the kind of surprise a mail admin must not get.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import yaml

from .addresses import AddressError, parse_mailbox
from .business_hours import BusinessHours, HoursError, Week, parse_holidays, parse_hours, parse_timezone
from .errors import ConfigError, ConfigIssue
from .units import DAYS, HOURS, KB, MB, MINUTES, SECONDS, parse_duration, parse_size

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """A TCP ``host:port`` or a ``unix:/path`` socket."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class ListenerConfig:
    protocol: Literal["smtp", "lmtp"]
    address: Endpoint
    name: str
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class StoreConfig:
    path: Path


@dataclass(frozen=True)
class SupportConfig:
    addresses: tuple[str, ...]
    reply_secret: str
    bounce_address: str
    reply_name: str = "{agent} via Support"  # display name on relayed agent replies; {agent} is the agent

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(a.rpartition("@")[2] for a in self.addresses)


@dataclass(frozen=True)
class TicketsConfig:
    prefix: str = "SUP"
    first_number: int = 1000


@dataclass(frozen=True)
class RetryConfig:
    first: float = 1 * MINUTES
    max: float = 1 * HOURS
    give_up: float = 5 * DAYS

    def delay(self, attempts: int) -> float:
        """Backoff after ``attempts`` failed tries: doubles from ``first`` up to ``max``."""
        return min(self.max, self.first * (2 ** max(0, attempts - 1)))


# Sessions to the relay, each one delivery at a time. Under a burst, 4 left forwards
# queueing behind each other's round trips (bench/RESULTS.md); Postfix itself opens up
# to 20 per destination.
RELAY_CONCURRENCY = 16


@dataclass(frozen=True)
class RelayConfig:
    address: Endpoint
    retry: RetryConfig = RetryConfig()
    timeout: float = 60 * SECONDS
    concurrency: int = RELAY_CONCURRENCY
    starttls: bool = False
    ca_file: Path | None = None  # verify the relay's certificate against this alone (else the system's CAs)


@dataclass(frozen=True)
class MetricsConfig:
    address: Endpoint | None = None


# Local parts of senders that are machines (matched case-insensitively, anywhere).
DEFAULT_SUPPRESS_SENDERS: tuple[str, ...] = (
    r"^(mailer-daemon|postmaster|abuse|root|daemon|nobody)$",
    r"(^|[._+-])(no-?reply|do-?not-?reply)([._+-]|$)",
    r"^bounces?([._+=-]|$)",
    r"^owner-",
    r"-request$",
)


@dataclass(frozen=True)
class RateConfig:
    """Receipts per sender address and per sender domain within ``window``, and per day overall."""

    per_sender: int = 3
    per_domain: int = 10
    window: float = 10 * MINUTES
    daily: int = 1000


@dataclass(frozen=True)
class AutoreplyConfig:
    """Receipts are opt-in: without an ``autoreply`` section gatewayd sends none."""

    enabled: bool = False
    followups: Literal["none", "acknowledge"] = "none"
    rate: RateConfig = RateConfig()
    suppress_senders: tuple[str, ...] = DEFAULT_SUPPRESS_SENDERS
    templates: Any = None  # gatewayd.templates.Templates when enabled


@dataclass(frozen=True)
class AuthenticationConfig:
    """What to do with mail whose DKIM verdict is fail (signed, and no signature holds)."""

    unauthenticated: Literal["accept", "no_receipt", "reject"] = "accept"


@dataclass(frozen=True)
class DkimConfig:
    domain: str
    selector: str
    key_file: Path
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


@dataclass(frozen=True)
class DnsConfig:
    resolver: Endpoint | None = None
    timeout: float = 2 * SECONDS


@dataclass(frozen=True)
class SlaTargets:
    """Overrides for one team or priority; None keeps what the level above says."""

    ack: float | None = None
    first_response: float | None = None
    business_hours: "BusinessHours | None" = None


@dataclass(frozen=True)
class SlaConfig:
    """Acknowledgement and first-response targets; see :mod:`gatewayd.sla` for how they combine."""

    ack: float = 15 * MINUTES
    first_response: float = 24 * HOURS
    teams: Mapping[str, SlaTargets] = field(default_factory=lambda: MappingProxyType({}))
    priorities: Mapping[str, SlaTargets] = field(default_factory=lambda: MappingProxyType({}))
    reopen_window: float = 7 * DAYS
    webhook: str | None = None
    scan_interval: float = 30 * SECONDS


@dataclass(frozen=True)
class TeamConfig:
    name: str
    supervisor: str


@dataclass(frozen=True)
class AgentConfig:
    name: str
    address: str
    teams: tuple[str, ...]
    timezone: str | None = None


@dataclass(frozen=True)
class RoutingEntry:
    """One link of the routing chain: the plugin's name and its own (read-only) options.

    ``line`` is kept so the plugin loader can name the entry's line when the
    plugin rejects its options.
    """

    index: int
    plugin: str
    options: Mapping[str, Any]
    line: int | None
    timeout: float | None = None
    option_lines: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class FallbackConfig:
    team: str


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 32 * MB
    max_recipients: int = 100
    max_line_length: int = 998
    max_header_size: int = 100 * KB
    max_connections: int = 200
    idle_timeout: float = 5 * MINUTES
    data_timeout: float = 10 * MINUTES
    bare_newlines: Literal["reject", "normalize"] = "reject"
    max_received_headers: int = 50
    duplicate_window: float = 7 * DAYS
    mime_depth: int = 100


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["keyvalue", "json"] = "keyvalue"
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    source: Path
    hostname: str
    listeners: tuple[ListenerConfig, ...]
    store: StoreConfig
    support: SupportConfig
    tickets: TicketsConfig
    relay: RelayConfig
    metrics: MetricsConfig
    autoreply: AutoreplyConfig
    authentication: AuthenticationConfig
    business_hours: BusinessHours | None
    dkim: DkimConfig | None
    dns: DnsConfig
    sla: SlaConfig
    teams: tuple[TeamConfig, ...]
    agents: tuple[AgentConfig, ...]
    routing: tuple[RoutingEntry, ...]
    fallback: FallbackConfig
    limits: LimitsConfig
    logging: LoggingConfig
    shutdown_grace: float
    plugin_paths: tuple[Path, ...]

    def team(self, name: str) -> TeamConfig | None:
        return next((t for t in self.teams if t.name == name), None)

    def agent(self, name: str) -> AgentConfig | None:
        return next((a for a in self.agents if a.name == name), None)


# --------------------------------------------------------------------------- reading


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class _Reader:
    """Walks the plain YAML value while knowing the line of every key path."""

    def __init__(self, file: str, data: Any, lines: dict[str, int]) -> None:
        self.file = file
        self.data = data
        self.lines = lines
        self.issues: list[ConfigIssue] = []

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            parent = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)
            path = "" if parent == path else parent
        return self.lines.get("")

    def error(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, self.line(path), path, message))

    def section(self, parent: Mapping[str, Any], key: str, path: str, allowed: set[str]) -> dict[str, Any]:
        """A mapping-valued key; missing means empty. Unknown keys inside are reported."""
        value = parent.get(key, MISSING)
        if value is MISSING or value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, not {_kind(value)}")
            return {}
        self.unknown(value, path, allowed)
        return value

    def unknown(self, mapping: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in mapping:
            if key not in allowed:
                sub = f"{path}.{key}" if path else str(key)
                hint = ", ".join(sorted(allowed))
                self.error(sub, f"unknown key (expected one of: {hint})")

    def value(self, mapping: Mapping[str, Any], key: str, path: str, convert: Callable[[Any], T],
              default: T | _Missing = MISSING, *, required: bool = False) -> T | Any:
        """The converted value of ``key``; a missing key is an error when there is no default or ``required``."""
        raw = mapping.get(key, MISSING)
        if raw is MISSING or raw is None:
            if default is MISSING or required:
                self.error(path, "is required")
            return default
        try:
            return convert(raw)
        except (ValueError, TypeError, AddressError) as exc:
            self.error(path, str(exc))
            return default


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number",
            float: "a number", bool: "a boolean"}.get(type(value), type(value).__name__)


def _line_map(node: yaml.Node, path: str = "", out: dict[str, int] | None = None,
              seen: set[int] | None = None) -> dict[str, int]:
    """Maps key paths such as ``listeners[0].address`` to 1-based line numbers.

    A node reached again through a YAML alias is not walked twice, so recursive
    or exponentially aliased documents cannot hang the loader.
    """
    out = {} if out is None else out
    seen = set() if seen is None else seen
    out.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen:
        return out
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = f"{path}.{key_node.value}" if path else str(key_node.value)
            out[sub] = key_node.start_mark.line + 1
            _line_map(value_node, sub, out, seen)
            out[sub] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, f"{path}[{i}]", out, seen)
    return out


def _duplicate_keys(node: yaml.Node, file: str, path: str = "",
                    seen: set[int] | None = None) -> Iterator[ConfigIssue]:
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            sub = f"{path}.{key_node.value}" if path else str(key_node.value)
            if key_node.value in seen:
                yield ConfigIssue(file, key_node.start_mark.line + 1, sub, "duplicate key")
            seen.add(key_node.value)
            yield from _duplicate_keys(value_node, file, sub, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, file, f"{path}[{i}]", seen)


# --------------------------------------------------------------------------- converters


def _text(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"must be a string, not {_kind(value)}")
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("must not contain control characters")
    return text


def _name(value: Any) -> str:
    text = _text(value)
    if not _NAME.match(text):
        raise ValueError(f"{text!r} is not a valid name (letters, digits, '_', '.', '-')")
    return text


def _hostname(value: Any) -> str:
    text = _text(value)
    if not _HOSTNAME.match(text):
        raise ValueError(f"{text!r} is not a valid host name")
    return text.lower()


def _address(value: Any) -> str:
    return parse_mailbox(_text(value))


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number of at least 1, not {value!r}")
    return value


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


def _choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _text(value)
        if text not in options:
            raise ValueError(f"{text!r} is not one of: {', '.join(options)}")
        return text
    return convert


def parse_endpoint(value: Any, *, allow_unix: bool = True) -> Endpoint:
    """``host:port``, ``[v6]:port`` or ``unix:/path``."""
    text = _text(value).strip()
    if text.startswith("unix:"):
        if not allow_unix:
            raise ValueError(f"{text!r}: unix sockets are not supported here")
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a socket path, e.g. unix:/run/gatewayd/lmtp.sock")
        return Endpoint(path=path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} needs a port, as host:port")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port")
    if not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} is not an IP address or host name") from None
    return Endpoint(host=host, port=port)


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


# --------------------------------------------------------------------------- loading


def load(path: str | Path) -> Config:
    """Reads and validates ``path``; raises :class:`ConfigError` listing every problem."""
    source = Path(path)
    name = str(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(name, None, "", f"cannot read: {exc}")]) from None
    return loads(text, name, source)


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader without implicit timestamps: a config never holds dates, and an
    impossible one (``2001-02-30``) must become a located error, not a traceback."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_issue(name: str, exc: Exception, what: str) -> ConfigIssue:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigIssue(name, line, "", f"{what}: {problem}")


def loads(text: str, name: str = "<config>", source: Path | None = None) -> Config:
    """Validates config ``text`` (``name`` labels its errors); raises :class:`ConfigError` listing every problem."""
    loader = _ConfigLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise ConfigError([_yaml_issue(name, exc, "YAML syntax error")]) from None
        if node is None:
            raise ConfigError([ConfigIssue(name, 1, "", "the file is empty")])
        issues = list(_duplicate_keys(node, name))
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise ConfigError([*issues, _yaml_issue(name, exc, "YAML value error")]) from None
        except (ValueError, TypeError, OverflowError) as exc:
            raise ConfigError([*issues, ConfigIssue(name, None, "", f"YAML value error: {exc}")]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError([*issues, ConfigIssue(name, 1, "", "the top level must be a mapping of keys")])
    reader = _Reader(name, data, _line_map(node))
    config = _build(reader, data, source or Path(name))
    issues.extend(reader.issues)
    if issues:
        raise ConfigError(sorted(issues, key=lambda issue: issue.line or 0))
    assert config is not None
    return config


_TOP = {"hostname", "listeners", "store", "support", "tickets", "relay", "metrics", "autoreply",
        "authentication", "business_hours", "dkim", "dns", "sla", "teams", "agents", "routing", "fallback", "limits", "logging",
        "shutdown_grace", "plugin_paths"}


def _build(r: _Reader, data: dict[str, Any], source: Path) -> Config | None:
    r.unknown(data, "", _TOP)
    hostname = r.value(data, "hostname", "hostname", _hostname, "localhost")
    listeners = _listeners(r, data)
    store = r.section(data, "store", "store", {"path"})
    store_cfg = StoreConfig(path=r.value(store, "path", "store.path", lambda v: Path(_text(v)),
                                         Path("var/gatewayd.sqlite3")))
    support = _support(r, data)
    tickets = r.section(data, "tickets", "tickets", {"prefix", "first_number"})
    tickets_cfg = TicketsConfig(
        prefix=r.value(tickets, "prefix", "tickets.prefix", _ticket_prefix, "SUP"),
        first_number=r.value(tickets, "first_number", "tickets.first_number", _positive_int, 1000),
    )
    relay_cfg = _relay(r, data)
    metrics = r.section(data, "metrics", "metrics", {"address"})
    metrics_cfg = MetricsConfig(address=r.value(
        metrics, "address", "metrics.address", lambda v: parse_endpoint(v, allow_unix=False), None))
    authentication = r.section(data, "authentication", "authentication", {"unauthenticated"})
    authentication_cfg = AuthenticationConfig(unauthenticated=r.value(
        authentication, "unauthenticated", "authentication.unauthenticated",
        _choice("accept", "no_receipt", "reject"), "accept"))
    business_hours_cfg = _business_hours(r, data)
    dkim_cfg = _dkim(r, data)
    dns = r.section(data, "dns", "dns", {"resolver", "timeout"})
    dns_cfg = DnsConfig(
        resolver=r.value(dns, "resolver", "dns.resolver", lambda v: parse_endpoint(v, allow_unix=False), None),
        timeout=r.value(dns, "timeout", "dns.timeout", _positive_duration, 2 * SECONDS),
    )
    sla_cfg = _sla(r, data)
    teams = _teams(r, data)
    agents = _agents(r, data, {t.name for t in teams})
    autoreply_cfg = _autoreply(r, data, source, [t.name for t in teams])
    routing = _routing(r, data)
    fallback = r.section(data, "fallback", "fallback", {"team"})
    fallback_team = r.value(fallback, "team", "fallback.team", _name, teams[0].name if teams else "")
    if teams and fallback_team and fallback_team not in {t.name for t in teams}:
        r.error("fallback.team", f"team {fallback_team!r} is not defined under teams")
    limits_cfg = _limits(r, data)
    logging = r.section(data, "logging", "logging", {"format", "level"})
    logging_cfg = LoggingConfig(
        format=r.value(logging, "format", "logging.format", _choice("keyvalue", "json"), "keyvalue"),
        level=r.value(logging, "level", "logging.level",
                      lambda v: _choice("DEBUG", "INFO", "WARNING", "ERROR")(str(v).upper()), "INFO"),
    )
    grace = r.value(data, "shutdown_grace", "shutdown_grace", parse_duration, 30 * SECONDS)
    plugin_paths = r.value(data, "plugin_paths", "plugin_paths",
                           lambda v: tuple(Path(_text(p)) for p in _list(v)), (Path("plugins"),))
    if r.issues:
        return None
    return Config(
        source=source, hostname=hostname, listeners=listeners, store=store_cfg, support=support,
        tickets=tickets_cfg, relay=relay_cfg, metrics=metrics_cfg, autoreply=autoreply_cfg,
        authentication=authentication_cfg, business_hours=business_hours_cfg, dkim=dkim_cfg, dns=dns_cfg, sla=sla_cfg, teams=teams, agents=agents, routing=routing,
        fallback=FallbackConfig(team=fallback_team), limits=limits_cfg, logging=logging_cfg,
        shutdown_grace=grace, plugin_paths=plugin_paths,
    )


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list, not {_kind(value)}")
    return value


def _items(r: _Reader, data: Mapping[str, Any], key: str, required: bool) -> list[tuple[str, dict[str, Any]]]:
    """The mapping items of a list-valued key, each with its path."""
    raw = data.get(key)
    if raw is None:
        if required:
            r.error(key, "is required")
        return []
    if not isinstance(raw, list):
        r.error(key, f"must be a list, not {_kind(raw)}")
        return []
    items = []
    for i, item in enumerate(raw):
        path = f"{key}[{i}]"
        if not isinstance(item, dict):
            r.error(path, f"must be a mapping, not {_kind(item)}")
            continue
        items.append((path, item))
    return items


def _ticket_prefix(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(r"[A-Z][A-Z0-9]{0,15}", text):
        raise ValueError(f"{text!r} must be 1-16 capital letters or digits, starting with a letter")
    return text


def _listeners(r: _Reader, data: Mapping[str, Any]) -> tuple[ListenerConfig, ...]:
    result: list[ListenerConfig] = []
    names: set[str] = set()
    for path, item in _items(r, data, "listeners", required=True):
        r.unknown(item, path, {"protocol", "address", "name", "tls"})
        protocol = r.value(item, "protocol", f"{path}.protocol", _choice("smtp", "lmtp"), None, required=True)
        endpoint = r.value(item, "address", f"{path}.address", parse_endpoint, None, required=True)
        tls = None
        tls_raw = r.section(item, "tls", f"{path}.tls", {"cert_file", "key_file"})
        if tls_raw:
            tls = TlsConfig(
                cert_file=r.value(tls_raw, "cert_file", f"{path}.tls.cert_file", lambda v: Path(_text(v)), Path()),
                key_file=r.value(tls_raw, "key_file", f"{path}.tls.key_file", lambda v: Path(_text(v)), Path()),
            )
        name = r.value(item, "name", f"{path}.name", _name, protocol or "listener")
        if name in names and "name" not in item:
            name = f"{name}{len(result)}"
        if name in names:
            r.error(f"{path}.name", f"listener name {name!r} is used twice")
        names.add(name)
        if protocol and endpoint:
            result.append(ListenerConfig(protocol=protocol, address=endpoint, name=name, tls=tls))
    if "listeners" in data and not result and not r.issues:
        r.error("listeners", "needs at least one listener")
    return tuple(result)


def _support(r: _Reader, data: Mapping[str, Any]) -> SupportConfig:
    support = r.section(data, "support", "support", {"addresses", "reply_secret", "bounce_address", "reply_name"})
    if "support" not in data:
        r.error("support", "is required (support.addresses and support.reply_secret)")
    addresses: tuple[str, ...] = ()
    raw = support.get("addresses")
    if isinstance(raw, list) and raw:
        checked = []
        for i, item in enumerate(raw):
            value = r.value({"a": item}, "a", f"support.addresses[{i}]", _address, None, required=True)
            if value:
                checked.append(value.lower())
        addresses = tuple(checked)
    elif "support" in data:
        r.error("support.addresses", "must be a non-empty list of addresses")
    secret = r.value(support, "reply_secret", "support.reply_secret", _text, "")
    if secret and len(secret) < 8:
        r.error("support.reply_secret", "must be at least 8 characters (it keys the reply-address HMAC)")
    default_bounce = f"bounces@{addresses[0].rpartition('@')[2]}" if addresses else "bounces@localhost"
    bounce = r.value(support, "bounce_address", "support.bounce_address", _address, default_bounce).lower()
    if bounce in addresses:
        r.error("support.bounce_address", "must differ from every support address")
    reply_name = r.value(support, "reply_name", "support.reply_name", _display_template, "{agent} via Support")
    return SupportConfig(addresses=addresses, reply_secret=secret, bounce_address=bounce, reply_name=reply_name)


def _display_template(value: Any) -> str:
    text = _text(value)
    if any(ord(c) < 32 for c in text) or text.replace("{agent}", "").count("{") or "}" in text.replace("{agent}", ""):
        raise ValueError("must be one line; the only placeholder is {agent}")
    return text


def _relay(r: _Reader, data: Mapping[str, Any]) -> RelayConfig:
    relay = r.section(data, "relay", "relay", {"address", "retry", "timeout", "concurrency", "starttls",
                                                           "ca_file"})
    if "relay" not in data:
        r.error("relay", "is required (relay.address: the MTA that sends gatewayd's mail)")
    retry = r.section(relay, "retry", "relay.retry", {"first", "max", "give_up"})
    retry_cfg = RetryConfig(
        first=r.value(retry, "first", "relay.retry.first", _positive_duration, 1 * MINUTES),
        max=r.value(retry, "max", "relay.retry.max", _positive_duration, 1 * HOURS),
        give_up=r.value(retry, "give_up", "relay.retry.give_up", _positive_duration, 5 * DAYS),
    )
    if retry_cfg.max < retry_cfg.first:
        r.error("relay.retry.max", "must not be shorter than relay.retry.first")
    starttls = r.value(relay, "starttls", "relay.starttls", _bool, False)
    ca_file = r.value(relay, "ca_file", "relay.ca_file", lambda v: Path(_text(v)), None)
    if ca_file is not None:
        if not starttls:
            r.error("relay.ca_file", "is only used with relay.starttls: true")
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            r.error("relay.ca_file", f"cannot load CA certificates from {str(ca_file)!r}: {exc}")
    return RelayConfig(
        address=r.value(relay, "address", "relay.address", lambda v: parse_endpoint(v, allow_unix=False),
                        Endpoint("127.0.0.1", 25)),
        retry=retry_cfg,
        timeout=r.value(relay, "timeout", "relay.timeout", _positive_duration, 60 * SECONDS),
        concurrency=r.value(relay, "concurrency", "relay.concurrency", _positive_int, RELAY_CONCURRENCY),
        starttls=starttls,
        ca_file=ca_file,
    )


def _autoreply(r: _Reader, data: Mapping[str, Any], source: Path, teams: list[str]) -> AutoreplyConfig:
    from .templates import load_templates

    d = AutoreplyConfig()
    autoreply = r.section(data, "autoreply", "autoreply",
                          {"enabled", "followups", "rate", "suppress_senders", "templates"})
    rate = r.section(autoreply, "rate", "autoreply.rate", {"per_sender", "per_domain", "window", "daily"})
    rate_cfg = RateConfig(
        per_sender=r.value(rate, "per_sender", "autoreply.rate.per_sender", _positive_int, d.rate.per_sender),
        per_domain=r.value(rate, "per_domain", "autoreply.rate.per_domain", _positive_int, d.rate.per_domain),
        window=r.value(rate, "window", "autoreply.rate.window", _positive_duration, d.rate.window),
        daily=r.value(rate, "daily", "autoreply.rate.daily", _positive_int, d.rate.daily),
    )
    enabled = r.value(autoreply, "enabled", "autoreply.enabled", _bool, bool(autoreply))
    followups = r.value(autoreply, "followups", "autoreply.followups", _choice("none", "acknowledge"), "none")
    suppress = r.value(autoreply, "suppress_senders", "autoreply.suppress_senders",
                       lambda v: tuple(_pattern(p) for p in _list(v)), d.suppress_senders)
    directory = r.value(autoreply, "templates", "autoreply.templates", lambda v: Path(_text(v)), Path("templates"))
    templates = None
    if enabled and directory is not None:
        kinds = ("receipt", "followup") if followups == "acknowledge" else ("receipt",)
        try:
            templates = load_templates(source.parent / directory, kinds, teams)
        except ValueError as exc:
            r.error("autoreply.templates", str(exc))
    return AutoreplyConfig(enabled=enabled, followups=followups, rate=rate_cfg, suppress_senders=suppress,
                           templates=templates)


def _pattern(value: Any) -> str:
    text = _text(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a valid regular expression: {exc}") from None
    return text


def _business_hours(r: _Reader, data: Mapping[str, Any]) -> BusinessHours | None:
    return _hours_section(r, data.get("business_hours"), "business_hours")


def _hours_section(r: _Reader, raw: Any, path: str) -> BusinessHours | None:
    """``timezone``, ``hours`` and ``holidays``: the top-level ``business_hours`` and a team's own."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        r.error(path, f"must be a mapping, not {_kind(raw)}")
        return None
    r.unknown(raw, path, {"timezone", "hours", "holidays"})
    zone = r.value(raw, "timezone", f"{path}.timezone", lambda v: parse_timezone(_text(v)), None, required=True)
    week = _week(r, raw.get("hours"), f"{path}.hours")
    holidays = r.value(raw, "holidays", f"{path}.holidays", lambda v: parse_holidays(_list(v)), frozenset())
    if zone is None or week is None:
        return None
    return BusinessHours(timezone=zone, week=week, holidays=holidays)


def _week(r: _Reader, value: Any, path: str) -> Week | None:
    """Errors name the day entry at fault (``business_hours.hours.mon-fri``) with its own line."""
    if value is None:
        r.error(path, "is required")
        return None
    if not isinstance(value, dict):
        r.error(path, f"must be a mapping of days to spans (mon-fri: \"09:00-17:00\"), not {_kind(value)}")
        return None
    try:
        week = parse_hours(value)
    except HoursError as exc:
        r.error(f"{path}.{exc.key}", exc.reason)
        return None
    if not any(week):
        r.error(path, "needs at least one opening span (a week that is never open has no answer time)")
        return None
    return week


def _dkim(r: _Reader, data: Mapping[str, Any]) -> DkimConfig | None:
    from .dkim import load_private_key

    if data.get("dkim") is None:
        return None
    dkim = r.section(data, "dkim", "dkim", {"domain", "selector", "key_file", "algorithm"})
    if not dkim:
        return None
    cfg = DkimConfig(
        domain=r.value(dkim, "domain", "dkim.domain", _hostname, ""),
        selector=r.value(dkim, "selector", "dkim.selector", _name, ""),
        key_file=r.value(dkim, "key_file", "dkim.key_file", lambda v: Path(_text(v)), Path()),
        algorithm=r.value(dkim, "algorithm", "dkim.algorithm", _choice("rsa-sha256", "ed25519-sha256"),
                          "rsa-sha256"),
    )
    if cfg.key_file != Path():
        try:
            load_private_key(cfg.key_file, cfg.algorithm)
        except ValueError as exc:
            r.error("dkim.key_file", str(exc))
    return cfg


def _teams(r: _Reader, data: Mapping[str, Any]) -> tuple[TeamConfig, ...]:
    teams: list[TeamConfig] = []
    for path, item in _items(r, data, "teams", required=True):
        r.unknown(item, path, {"name", "supervisor"})
        name = r.value(item, "name", f"{path}.name", _name, None, required=True)
        supervisor = r.value(item, "supervisor", f"{path}.supervisor", _address, None, required=True)
        if name in {t.name for t in teams}:
            r.error(f"{path}.name", f"team {name!r} is defined twice")
        elif name and supervisor:
            teams.append(TeamConfig(name=name, supervisor=supervisor))
    return tuple(teams)


def _agents(r: _Reader, data: Mapping[str, Any], team_names: set[str]) -> tuple[AgentConfig, ...]:
    agents: list[AgentConfig] = []
    for path, item in _items(r, data, "agents", required=True):
        r.unknown(item, path, {"name", "address", "teams", "timezone"})
        name = r.value(item, "name", f"{path}.name", _name, None, required=True)
        address = r.value(item, "address", f"{path}.address", _address, None, required=True)
        teams = r.value(item, "teams", f"{path}.teams", lambda v: tuple(_name(t) for t in _list(v)), ())
        for team in teams:
            if team_names and team not in team_names:
                r.error(f"{path}.teams", f"team {team!r} is not defined under teams")
        timezone = r.value(item, "timezone", f"{path}.timezone", _timezone, None)
        if name in {a.name for a in agents}:
            r.error(f"{path}.name", f"agent {name!r} is defined twice")
        elif name and address:
            agents.append(AgentConfig(name=name, address=address.lower(), teams=teams, timezone=timezone))
    return tuple(agents)


def _timezone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    text = _text(value)
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{text!r} is not a known time zone (e.g. Europe/Berlin)") from None
    return text


def _routing(r: _Reader, data: Mapping[str, Any]) -> tuple[RoutingEntry, ...]:
    entries: list[RoutingEntry] = []
    for path, item in _items(r, data, "routing", required=False):
        index = int(path[len("routing["):-1])
        plugin = r.value(item, "plugin", f"{path}.plugin", _name, None, required=True)
        timeout = r.value(item, "timeout", f"{path}.timeout", _positive_duration, None)
        options = {k: v for k, v in item.items() if k not in {"plugin", "timeout"}}
        option_lines = {k: r.line(f"{path}.{k}") or 0 for k in options}
        if plugin:
            entries.append(RoutingEntry(
                index=index, plugin=plugin, options=_frozen(options), line=r.line(path),
                timeout=timeout, option_lines=MappingProxyType(option_lines)))
    return tuple(entries)


def _limits(r: _Reader, data: Mapping[str, Any]) -> LimitsConfig:
    d = LimitsConfig()
    limits = r.section(data, "limits", "limits", set(LimitsConfig.__dataclass_fields__))
    cfg = LimitsConfig(
        max_message_size=r.value(limits, "max_message_size", "limits.max_message_size", parse_size, d.max_message_size),
        max_recipients=r.value(limits, "max_recipients", "limits.max_recipients", _positive_int, d.max_recipients),
        max_line_length=r.value(limits, "max_line_length", "limits.max_line_length", _positive_int, d.max_line_length),
        max_header_size=r.value(limits, "max_header_size", "limits.max_header_size", parse_size, d.max_header_size),
        max_connections=r.value(limits, "max_connections", "limits.max_connections", _positive_int, d.max_connections),
        idle_timeout=r.value(limits, "idle_timeout", "limits.idle_timeout", _positive_duration, d.idle_timeout),
        data_timeout=r.value(limits, "data_timeout", "limits.data_timeout", _positive_duration, d.data_timeout),
        bare_newlines=r.value(limits, "bare_newlines", "limits.bare_newlines", _choice("reject", "normalize"),
                              d.bare_newlines),
        max_received_headers=r.value(limits, "max_received_headers", "limits.max_received_headers",
                                     _positive_int, d.max_received_headers),
        duplicate_window=r.value(limits, "duplicate_window", "limits.duplicate_window", _positive_duration,
                                 d.duplicate_window),
        mime_depth=r.value(limits, "mime_depth", "limits.mime_depth", _positive_int, d.mime_depth),
    )
    if cfg.max_line_length > 998:
        r.error("limits.max_line_length", "must be at most 998 (RFC 5322); longer lines are refused")
    return cfg


_SLA_KEYS = {"ack", "first_response", "business_hours"}


def _sla(r: _Reader, data: Mapping[str, Any]) -> SlaConfig:
    sla = r.section(data, "sla", "sla", _SLA_KEYS - {"business_hours"} | {
        "teams", "priorities", "reopen_window", "webhook", "scan_interval"})
    d = SlaConfig()
    team_names = {t.get("name") for _, t in _items(r, data, "teams", required=False)}
    overrides: dict[str, dict[str, SlaTargets]] = {"teams": {}, "priorities": {}}
    for key, allowed in (("teams", team_names), ("priorities", {"high", "normal", "low"})):
        for name, item in r.section(sla, key, f"sla.{key}", {str(n) for n in allowed if n}).items():
            path = f"sla.{key}.{name}"
            if not isinstance(item, dict):
                r.error(path, f"must be a mapping, not {_kind(item)}")
                continue
            r.unknown(item, path, _SLA_KEYS if key == "teams" else _SLA_KEYS - {"business_hours"})
            overrides[key][str(name)] = SlaTargets(
                ack=r.value(item, "ack", f"{path}.ack", _positive_duration, None),
                first_response=r.value(item, "first_response", f"{path}.first_response", _positive_duration, None),
                business_hours=_hours_section(r, item.get("business_hours"), f"{path}.business_hours"))
    webhook = r.value(sla, "webhook", "sla.webhook", _text, None)
    if webhook is not None and not re.match(r"^https?://[^\s/]+", webhook):
        r.error("sla.webhook", "must be an http:// or https:// URL")
    return SlaConfig(
        ack=r.value(sla, "ack", "sla.ack", _positive_duration, d.ack),
        first_response=r.value(sla, "first_response", "sla.first_response", _positive_duration, d.first_response),
        teams=MappingProxyType(overrides["teams"]), priorities=MappingProxyType(overrides["priorities"]),
        reopen_window=r.value(sla, "reopen_window", "sla.reopen_window", parse_duration, d.reopen_window),
        webhook=webhook,
        scan_interval=r.value(sla, "scan_interval", "sla.scan_interval", _positive_duration, d.scan_interval),
    )
