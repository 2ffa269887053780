"""The plugin author's test kit: messages, agents, tickets, state, a fake clock, and a chain runner.

A plugin test should read like the routing it checks::

    from gatewayd.testing import make_agents, make_message, run_chain

    async def test_vip_goes_to_alice():
        result, trace = await run_chain(
            [(VipRouter, {"domains": ["bigcorp.example"], "agent": "alice"})],
            agents=make_agents("alice", "bob"),
            message=make_message(sender="ceo@bigcorp.example"),
        )
        assert result.agent == "alice"
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .discovery import PluginRegistry, PluginSpec
from .discovery import build_chain as _build_chain
from .dispatch import RoutingChain, RoutingResult, TraceStep
from .message_view import message_view_from_bytes
from .plugin import AgentView, MessageView, TicketView

__all__ = [
    "make_message", "message_from_text", "message_from_file", "make_agent", "make_agents", "make_ticket",
    "MemoryStateStore", "ReadOnlyStateStore", "FakeClock", "RecordingObserver", "build_chain", "run_chain",
    "EPOCH",
]

EPOCH = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
"""A Monday noon UTC: the default 'now' of the kit, so tests never depend on the real date."""

ChainItem = str | type | tuple[str | type, Mapping[str, Any]]


def make_message(*, subject: str = "Help needed", body: str = "", sender: str = "customer@example.test",
                 to: Sequence[str] = ("support@example.test",),
                 headers: Mapping[str, str | Sequence[str]] | None = None,
                 mail_from: str | None = None) -> MessageView:
    """A MessageView from its parts, without building MIME; header names are case-insensitive."""
    collected: dict[str, tuple[str, ...]] = {"subject": (subject,), "from": (sender,), "to": (", ".join(to),)}
    for name, value in (headers or {}).items():
        collected[name.lower()] = (value,) if isinstance(value, str) else tuple(value)
    return MessageView(mail_from=sender if mail_from is None else mail_from, rcpt_tos=tuple(to),
                       subject=subject, sender=sender.lower(), body=body,
                       headers=MappingProxyType(collected),
                       authentication_results=collected.get("authentication-results", ()),
                       message_id=collected.get("message-id", (None,))[0])


def message_from_text(text: str | bytes, *, mail_from: str = "customer@example.test",
                      rcpt_tos: Sequence[str] = ("support@example.test",)) -> MessageView:
    """Parses a whole RFC 5322 message (headers, blank line, body) exactly as gatewayd does."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return message_view_from_bytes(raw, mail_from, rcpt_tos)


def message_from_file(path: str | Path, *, mail_from: str = "customer@example.test",
                      rcpt_tos: Sequence[str] = ("support@example.test",)) -> MessageView:
    """Parses an ``.eml`` file."""
    return message_view_from_bytes(Path(path).read_bytes(), mail_from, rcpt_tos)


def make_agent(name: str, *, teams: Sequence[str] = ("support",), address: str | None = None,
               timezone: str | None = None, away: bool = False, open_tickets: int = 0) -> AgentView:
    return AgentView(name=name, address=address or f"{name}@agents.example.test", teams=tuple(teams),
                     timezone=timezone, away=away, open_tickets=open_tickets)


def make_agents(*names: str, teams: Sequence[str] = ("support",)) -> tuple[AgentView, ...]:
    """Several available agents with no open tickets, all in ``teams``."""
    return tuple(make_agent(name, teams=teams) for name in names)


def make_ticket(*, id: str = "SUP-1000", subject: str = "Help needed", customer: str = "customer@example.test",
                priority: str = "normal", team: str | None = None, agent: str | None = None,
                is_followup: bool = False, created_at: datetime = EPOCH, lapsed_agents: Sequence[str] = (),
                customer_previous_agents: Sequence[str] = ()) -> TicketView:
    return TicketView(id=id, subject=subject, customer=customer, priority=priority, created_at=created_at,
                      team=team, agent=agent, is_followup=is_followup, lapsed_agents=tuple(lapsed_agents),
                      customer_previous_agents=tuple(customer_previous_agents))


class MemoryStateStore:
    """An in-memory PluginStateStore that round-trips values through JSON, like the SQLite one."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], str] = {}

    async def get(self, plugin: str, key: str) -> Any | None:
        text = self.data.get((plugin, key))
        return None if text is None else json.loads(text)

    async def set(self, plugin: str, key: str, value: Any) -> None:
        self.data[(plugin, key)] = json.dumps(value)


class ReadOnlyStateStore:
    """Reads from a real store, keeps writes in memory: what ``route --explain`` needs to be side-effect free."""

    def __init__(self, backing: Any) -> None:
        self._backing = backing
        self.dropped: dict[tuple[str, str], Any] = {}

    async def get(self, plugin: str, key: str) -> Any | None:
        if (plugin, key) in self.dropped:
            return self.dropped[(plugin, key)]
        return await self._backing.get(plugin, key)

    async def set(self, plugin: str, key: str, value: Any) -> None:
        self.dropped[(plugin, key)] = value


class FakeClock:
    """A controllable 'now' (trio's MockClock idea); pass it as ``clock=`` or call ``.now()``."""

    def __init__(self, start: datetime | str = EPOCH) -> None:
        self._now = _aware(datetime.fromisoformat(start) if isinstance(start, str) else start)

    def __call__(self) -> datetime:
        return self._now

    def now(self) -> datetime:
        return self._now

    def set(self, when: datetime | str) -> None:
        self._now = _aware(datetime.fromisoformat(when) if isinstance(when, str) else when)

    def advance(self, seconds: float = 0.0, **delta: float) -> datetime:
        """Moves forward by ``seconds`` plus any ``timedelta`` keywords (``hours=8``)."""
        self._now += timedelta(seconds=seconds, **delta)
        return self._now


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class RecordingObserver:
    """Collects what the dispatcher reports, for assertions on metrics."""

    decisions: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def routing_decision(self, plugin: str, agent: str) -> None:
        self.decisions.append((plugin, agent))

    def plugin_error(self, plugin: str) -> None:
        self.errors.append(plugin)


def build_chain(plugins: Iterable[ChainItem], *, agents: Sequence[AgentView] = (),
                teams: Mapping[str, str] | None = None, fallback_team: str | None = None,
                observer: Any = None, clock: Any = None, plugin_paths: Sequence[str | Path] = (),
                **chain_options: Any) -> RoutingChain:
    """A chain from ``[(plugin, options), ...]`` without a config file.

    ``plugin`` is a registered name or the class itself; an options key
    ``timeout`` is the per-call timeout, as in the config. Teams default to the
    agents' teams (supervisor ``<team>-lead@example.test``); the fallback team
    defaults to the first agent's first team; the clock defaults to a
    :class:`FakeClock` at :data:`EPOCH`. Raises ConfigError like ``check-config``.
    """
    team_names = sorted({t for a in agents for t in a.teams}) or ["support"]
    supervisors = dict(teams) if teams is not None else {t: f"{t}-lead@example.test" for t in team_names}
    specs = []
    for index, item in enumerate(plugins):
        plugin, options = item if isinstance(item, tuple) else (item, {})
        options = dict(options)
        timeout = options.pop("timeout", None)
        specs.append(PluginSpec(plugin=plugin, options=options, index=index, timeout=timeout))
    first_team = agents[0].teams[0] if agents and agents[0].teams else next(iter(supervisors))
    return _build_chain(specs, supervisors=supervisors, fallback_team=fallback_team or first_team,
                        agents=[a.name for a in agents], observer=observer, clock=clock or FakeClock(),
                        registry=PluginRegistry([Path(p) for p in plugin_paths]), **chain_options)


async def run_chain(plugins: Iterable[ChainItem] | RoutingChain, *, agents: Sequence[AgentView],
                    message: MessageView | None = None, ticket: TicketView | None = None,
                    state: Any = None, now: datetime | str | None = None,
                    **build_options: Any) -> tuple[RoutingResult, tuple[TraceStep, ...]]:
    """Routes one ticket and returns ``(result, trace)``; pass a built chain to keep state between calls."""
    chain = plugins if isinstance(plugins, RoutingChain) else build_chain(plugins, agents=agents, **build_options)
    when = datetime.fromisoformat(now) if isinstance(now, str) else now
    result = await chain.route(ticket or make_ticket(), message or make_message(), agents,
                               state if state is not None else MemoryStateStore(),
                               _aware(when) if when is not None else None)
    return result, result.trace
