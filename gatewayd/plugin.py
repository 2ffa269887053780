"""The public routing-plugin API: everything a plugin author imports.

A plugin is a class with an ``api_version`` and a ``route`` hook. gatewayd
instantiates it once per configured ``routing:`` entry with an :class:`Options`
reader, then calls ``route`` for every ticket with frozen views of the ticket,
the message and the candidate agents. The hook answers with a :class:`Decision`
(pick, narrow, set priority, or abstain) and always a reason, because every
decision ends up in the ticket's explain trace.

Keep this surface small: anything added here is a promise to third-party code,
and a breaking change means bumping :data:`API_VERSION`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol

from .business_hours import HoursError, Week, is_open, parse_hours
from .units import parse_duration

__all__ = [
    "API_VERSION", "PRIORITIES", "Priority", "TicketView", "MessageView", "AgentView",
    "Decision", "Plugin", "PluginContext", "PluginState", "PluginStateStore", "Options",
    "OptionError", "OptionProblem", "REQUIRED", "Week", "HoursError", "parse_hours", "is_open",
]

API_VERSION: Final = 1
"""The hook contract this gatewayd provides; a plugin whose ``api_version`` differs is refused at load."""

Priority = Literal["high", "normal", "low"]
PRIORITIES: Final[tuple[str, ...]] = ("high", "normal", "low")


# --------------------------------------------------------------------------- views


@dataclass(frozen=True)
class TicketView:
    """The ticket being routed, as the store knows it before this routing run."""

    id: str
    subject: str
    customer: str
    priority: str
    created_at: datetime
    team: str | None = None
    agent: str | None = None
    is_followup: bool = False
    lapsed_agents: tuple[str, ...] = ()
    customer_previous_agents: tuple[str, ...] = ()


@dataclass(frozen=True)
class MessageView:
    """The parsed message: decoded subject and text body, headers, envelope, authentication results.

    ``headers`` maps lower-cased header names to every decoded value, in order.
    ``sender`` is the ``From`` header's address when it holds exactly one clean
    address, else the envelope sender.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    subject: str
    sender: str
    body: str
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    authentication_results: tuple[str, ...] = ()
    message_id: str | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        values = self.headers.get(name.lower())
        return values[0] if values else default

    @classmethod
    def _body_on_first_read(cls, extract: Callable[[], str], **fields: Any) -> MessageView:
        """A view whose ``body`` is ``extract()``, called when first read.

        For chains whose plugins all say they never read it (``reads_body``):
        for a long message extracting it costs more than the rest of routing.
        """
        view = cls(body="", **fields)
        del view.__dict__["body"]
        view.__dict__["_extract_body"] = extract
        return view

    if not TYPE_CHECKING:  # to type checkers, ``body`` is the str field it always reads as
        def __getattr__(self, name: str) -> Any:
            """Only the first read of a deferred ``body`` gets here (the value is then an attribute)."""
            extract = self.__dict__.get("_extract_body") if name == "body" else None
            if extract is None:
                if name == "body" and "body" in self.__dict__:
                    return self.__dict__["body"]  # another thread's extraction finished meanwhile
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            self.__dict__["_body_requested"] = True
            body = extract()
            self.__dict__["body"] = body
            self.__dict__.pop("_extract_body", None)  # and with it the message it held
            return body


@dataclass(frozen=True)
class AgentView:
    """One agent's live snapshot: configuration plus availability and load from the store."""

    name: str
    address: str
    teams: tuple[str, ...] = ()
    timezone: str | None = None
    away: bool = False
    open_tickets: int = 0

    @property
    def available(self) -> bool:
        return not self.away


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """What a plugin wants done, with the reason shown in the explain trace.

    Build one with :meth:`pick`, :meth:`narrow`, :meth:`set_priority` or
    :meth:`abstain`. A decision may combine narrowing, a priority and a pick;
    gatewayd applies them in that order.
    """

    reason: str
    agent: str | None = None
    team: str | None = None
    agents: frozenset[str] | None = None
    priority: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError("a Decision needs a non-empty reason")
        if self.agent is not None and not isinstance(self.agent, str):
            raise TypeError(f"agent must be an agent name, not {type(self.agent).__name__}")
        if self.team is not None and not isinstance(self.team, str):
            raise TypeError(f"team must be a team name, not {type(self.team).__name__}")
        if self.priority is not None and self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {self.priority!r}")
        if self.agents is not None:
            if isinstance(self.agents, str) or not all(isinstance(a, str) for a in self.agents):
                raise TypeError("agents must be a collection of agent names")
            object.__setattr__(self, "agents", frozenset(self.agents))

    @classmethod
    def pick(cls, agent: str, reason: str, *, priority: str | None = None) -> Decision:
        """Assign the ticket to ``agent``; the first pick in the chain wins."""
        return cls(reason=reason, agent=agent, priority=priority)

    @classmethod
    def narrow(cls, reason: str, *, team: str | None = None, agents: Iterable[str] | None = None,
               priority: str | None = None) -> Decision:
        """Restrict the candidates to ``team`` and/or to the ``agents`` subset."""
        if team is None and agents is None:
            raise ValueError("narrow() needs team= or agents=")
        return cls(reason=reason, team=team, agents=None if agents is None else frozenset(agents),
                   priority=priority)

    @classmethod
    def set_priority(cls, priority: str, reason: str) -> Decision:
        """Change the ticket's priority without touching the candidates."""
        return cls(reason=reason, priority=priority)

    @classmethod
    def abstain(cls, reason: str) -> Decision:
        """No opinion on this ticket; the chain moves on."""
        return cls(reason=reason)

    @property
    def outcome(self) -> str:
        """``pick``, ``narrow``, ``priority`` or ``pass``: the strongest thing this decision does."""
        if self.agent is not None:
            return "pick"
        if self.team is not None or self.agents is not None:
            return "narrow"
        if self.priority is not None:
            return "priority"
        return "pass"


# --------------------------------------------------------------------------- state and context


class PluginStateStore(Protocol):
    """Where plugin state persists (the core implements it over SQLite); values are JSON."""

    async def get(self, plugin: str, key: str) -> Any | None: ...

    async def set(self, plugin: str, key: str, value: Any) -> None: ...


class PluginState:
    """A plugin entry's own persistent key/value space; values must be JSON-serialisable."""

    def __init__(self, store: PluginStateStore, namespace: str) -> None:
        self._store = store
        self._namespace = namespace

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        value = await self._store.get(self._namespace, key)
        return default if value is None else value

    async def set(self, key: str, value: Any) -> None:
        """Stores ``value`` under ``key``; raises TypeError for anything JSON cannot hold."""
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"plugin state value for {key!r} is not JSON-serialisable: {exc}") from None
        await self._store.set(self._namespace, key, json.loads(text))


@dataclass(frozen=True)
class PluginContext:
    """Per-call facilities: the routing clock, persistent state, a logger and the chain's position.

    ``team`` is the team the candidates currently come from and ``priority`` the
    ticket's priority so far; ``agents`` is every configured agent, including
    those who are away or no longer candidates.
    """

    name: str
    team: str
    priority: str
    agents: tuple[AgentView, ...]
    state: PluginState
    logger: logging.Logger
    clock_now: datetime = field(repr=False)

    def now(self) -> datetime:
        """The routing run's time (timezone-aware, UTC); a fake clock in tests."""
        return self.clock_now


# --------------------------------------------------------------------------- options


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default marker for :class:`Options` getters: the option must be present."""


@dataclass(frozen=True)
class OptionProblem:
    """One invalid option; ``option`` is a path inside the entry such as ``rules[0].match.subject``."""

    option: str
    message: str

    def __str__(self) -> str:
        return f"{self.option}: {self.message}" if self.option else self.message


class OptionError(Exception):
    """Raised by a plugin's constructor to reject its options; gatewayd reports each problem with its line."""

    def __init__(self, message: str | None = None, *, option: str = "",
                 problems: Iterable[OptionProblem] = ()) -> None:
        found = list(problems)
        if message is not None:
            found.insert(0, OptionProblem(option, message))
        self.problems: tuple[OptionProblem, ...] = tuple(found)
        super().__init__("; ".join(str(p) for p in self.problems))


class Options:
    """Reads a routing entry's options and collects every problem instead of stopping at the first.

    Each getter records the key as known; after the constructor returns,
    gatewayd reports any key the plugin never asked for as an unknown option,
    so a typo such as ``max_opne`` cannot silently fall back to a default.
    ``teams`` and ``agents`` are the configured names, for validating references.
    """

    def __init__(self, raw: Mapping[str, Any], *, teams: Collection[str] = (),
                 agents: Collection[str] = ()) -> None:
        self.raw: Mapping[str, Any] = MappingProxyType(dict(raw))
        self.teams: frozenset[str] = frozenset(teams)
        self.agents: frozenset[str] = frozenset(agents)
        self._asked: list[str] = []
        self._problems: list[OptionProblem] = []

    def error(self, option: str, message: str) -> None:
        """Records a problem with ``option`` (a path such as ``hours.mon``)."""
        self._problems.append(OptionProblem(option, message))

    @property
    def problems(self) -> tuple[OptionProblem, ...]:
        return tuple(self._problems)

    def get(self, key: str, default: Any = REQUIRED) -> Any:
        """The raw value of ``key``; missing and REQUIRED records a problem and returns None."""
        if key not in self._asked:
            self._asked.append(key)
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is REQUIRED:
            self.error(key, "is required")
            return None
        return default

    def get_str(self, key: str, default: Any = REQUIRED) -> str | Any:
        value = self.get(key, default)
        if value is default or value is None:
            return value
        if not isinstance(value, str):
            self.error(key, f"must be a string, not {_kind(value)}")
            return default if default is not REQUIRED else None
        return value

    def get_int(self, key: str, default: Any = REQUIRED, *, minimum: int | None = None) -> int | Any:
        value = self.get(key, default)
        if value is default or value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"must be a whole number, not {value!r}")
            return default if default is not REQUIRED else None
        if minimum is not None and value < minimum:
            self.error(key, f"must be at least {minimum}, not {value}")
        return value

    def get_bool(self, key: str, default: Any = REQUIRED) -> bool | Any:
        value = self.get(key, default)
        if value is default or value is None:
            return value
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, not {value!r}")
            return default if default is not REQUIRED else None
        return value

    def get_duration(self, key: str, default: Any = REQUIRED) -> float | Any:
        """Seconds, from ``90``, ``30s``, ``15m``, ``24h`` or ``2d``."""
        value = self.get(key, default)
        if value is default or value is None:
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return default if default is not REQUIRED else None

    def get_list(self, key: str, default: Any = REQUIRED) -> tuple[Any, ...] | Any:
        value = self.get(key, default)
        if value is default or value is None:
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            self.error(key, f"must be a list, not {_kind(value)}")
            return default if default is not REQUIRED else None
        return tuple(value)

    def get_mapping(self, key: str, default: Any = REQUIRED) -> Mapping[str, Any] | Any:
        value = self.get(key, default)
        if value is default or value is None:
            return value
        if not isinstance(value, Mapping):
            self.error(key, f"must be a mapping, not {_kind(value)}")
            return default if default is not REQUIRED else None
        return value

    def check_team(self, option: str, name: Any) -> bool:
        """True if ``name`` is a configured team; otherwise records a problem at ``option``."""
        if not isinstance(name, str) or (self.teams and name not in self.teams):
            known = ", ".join(sorted(self.teams)) or "none"
            self.error(option, f"team {name!r} is not defined under teams (known: {known})")
            return False
        return True

    def check_agent(self, option: str, name: Any) -> bool:
        """True if ``name`` is a configured agent; otherwise records a problem at ``option``."""
        if not isinstance(name, str) or (self.agents and name not in self.agents):
            known = ", ".join(sorted(self.agents)) or "none"
            self.error(option, f"agent {name!r} is not defined under agents (known: {known})")
            return False
        return True

    def finish(self) -> None:
        """Raises :class:`OptionError` with every problem and unknown key; gatewayd calls it for you."""
        problems = list(self._problems)
        for key in self.raw:
            if key not in self._asked:
                hint = f" (this plugin accepts: {', '.join(self._asked)})" if self._asked else \
                    " (this plugin takes no options)"
                problems.append(OptionProblem(str(key), f"unknown option{hint}"))
        if problems:
            raise OptionError(problems=problems)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


# --------------------------------------------------------------------------- the plugin class


class Plugin:
    """Base class for routing plugins (optional: any class with ``api_version`` and ``route`` works).

    Subclass it, read options in ``__init__`` and implement ``route`` as a
    ``def`` (run in a worker thread) or an ``async def`` (run on the event loop,
    so it must never block). Either runs under a timeout, 1 s by default.
    """

    api_version: ClassVar[int] = API_VERSION
    reads_body: bool = True
    """False when ``route`` never reads ``message.body`` (a class or an instance attribute).

    When every plugin of the chain says so, gatewayd does not extract bodies
    (for a 100 KB message, most of the cost of routing it). A plugin without
    the attribute counts as reading them. One that reads the body anyway still
    gets it, only later and at its own hook's expense.
    """

    def __init__(self, options: Options) -> None:
        """Reads and validates ``options``; the base class accepts none."""

    def route(self, context: PluginContext, ticket: TicketView, message: MessageView,
              candidates: tuple[AgentView, ...]) -> Decision | None | Awaitable[Decision | None]:
        """Decides about one ticket; ``candidates`` are the available agents still in play."""
        raise NotImplementedError(f"{type(self).__name__} must implement route()")
