"""The routing chain runner: calls each plugin in config order and turns decisions into one owner.

Rules, in the order they apply:

* Candidates start as the available agents (not away, not in the ticket's
  ``lapsed_agents``) of the ticket's team, or of the ``fallback`` team for a
  new ticket.
* Narrowing accumulates: ``team=`` moves the candidate pool to that team and
  binds it (later picks must be members); ``agents=`` intersects with every
  earlier subset.
* The first valid pick wins and ends the chain. A pick of an agent who is
  unknown, away, lapsed or outside the narrowed candidates is ignored and
  counted as a garbage answer, so no plugin can route around the others.
* Each call runs under a timeout; an exception, timeout or garbage answer is
  logged with the plugin's name, reported to the observer and treated as a
  pass. After ``max_failures`` failures in a row a plugin is skipped for
  ``cooldown`` seconds.
* Without a pick, the least-loaded candidate of the current team takes the
  ticket (ties broken by name); with no candidate left, the team's
  supervisor does. A ticket is never dropped.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from .plugin import AgentView, Decision, MessageView, PluginContext, PluginState, PluginStateStore, TicketView

__all__ = ["RoutingChain", "RoutingResult", "TraceStep", "Link", "RoutingObserver", "PluginStateStore"]

log = logging.getLogger("gatewayd.dispatch")

DEFAULT_TIMEOUT = 1.0
MAX_FAILURES = 5
COOLDOWN = 60.0
HOOK_THREADS = 8
HOOK_THREADS_PER_PLUGIN = 2
_SUMMARY_LIMIT = 900


class RoutingObserver(Protocol):
    """Receives the metric events; the core maps them to Prometheus counters."""

    def routing_decision(self, plugin: str, agent: str) -> None: ...

    def plugin_error(self, plugin: str) -> None: ...


@dataclass(frozen=True)
class TraceStep:
    """One line of the explain trace.

    ``outcome`` is one of ``pick``, ``narrow``, ``priority``, ``pass``,
    ``error``, ``timeout``, ``garbage``, ``skipped`` (plugin calls) or
    ``fallback``, ``supervisor`` (the dispatcher's own steps).
    """

    plugin: str
    outcome: str
    reason: str
    ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "outcome": self.outcome, "reason": self.reason, "ms": self.ms}


@dataclass(frozen=True)
class RoutingResult:
    """Who owns the ticket now and why; ``supervisor`` is set only when nobody was available."""

    agent: str | None
    team: str | None
    priority: str
    supervisor: str | None
    trace: tuple[TraceStep, ...]
    summary: str
    decided_by: str

    def to_dict(self) -> dict[str, Any]:
        return {"agent": self.agent, "team": self.team, "priority": self.priority,
                "supervisor": self.supervisor, "decided_by": self.decided_by, "summary": self.summary,
                "trace": [step.to_dict() for step in self.trace]}


@dataclass(frozen=True)
class Link:
    """One configured plugin instance in the chain; ``name`` labels its trace, metrics and state."""

    name: str
    plugin: Any
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class _Health:
    failures: int = 0
    skip_until: float = 0.0


@dataclass
class _Run:
    """The mutable state of one routing run; never shared between runs."""

    team: str
    priority: str
    agents: Mapping[str, AgentView]
    excluded: frozenset[str]
    team_bound: bool = False
    subset: frozenset[str] | None = None
    trace: list[TraceStep] = field(default_factory=list)

    def candidates(self, team: str | None = None, subset: frozenset[str] | None = None) -> tuple[AgentView, ...]:
        team = self.team if team is None else team
        subset = self.subset if subset is None else subset
        return tuple(sorted(
            (a for a in self.agents.values()
             if not a.away and a.name not in self.excluded and team in a.teams
             and (subset is None or a.name in subset)),
            key=lambda a: a.name))


class _Garbage(Exception):
    """A plugin answered something the dispatcher cannot use."""


class HookThreads:
    """Runs ``def`` hooks on threads of their own: at most ``per_plugin`` per plugin, ``limit`` in all.

    Not on the loop's default pool: a hook that hangs past its timeout would
    hold one of that pool's few threads for good, starving relay sends and
    message parsing, and its non-daemon thread would keep the process from
    exiting. Here a hung hook holds one daemon thread; once its plugin holds
    ``per_plugin`` of them, its next call fails at once (a timeout, which soon
    puts it in cool-down) instead of queueing, and the other plugins keep
    theirs.
    """

    def __init__(self, limit: int, per_plugin: int) -> None:
        self.limit = limit
        self.per_plugin = per_plugin
        self.busy: dict[str, int] = {}

    def run(self, plugin: str, hook: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.busy.get(plugin, 0) >= self.per_plugin or sum(self.busy.values()) >= self.limit:
            future.set_exception(TimeoutError(f"{plugin} holds {self.busy.get(plugin, 0)} threads with hooks "
                                              "that did not return"))
            return future
        self.busy[plugin] = self.busy.get(plugin, 0) + 1

        def settle(result: Any, error: BaseException | None) -> None:
            self.busy[plugin] -= 1
            if future.done():
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        def call() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (hook(*args), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which judges it
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(settle, *outcome)
            except RuntimeError:
                pass  # the loop is gone: nobody waits for this hook any more

        threading.Thread(target=call, name="gatewayd-plugin-hook", daemon=True).start()
        return future


class RoutingChain:
    """A loaded chain of plugins; one instance lives as long as the configuration it came from."""

    def __init__(self, links: Sequence[Link], *, supervisors: Mapping[str, str], fallback_team: str,
                 observer: RoutingObserver | None = None,
                 clock: Callable[[], datetime] | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 max_failures: int = MAX_FAILURES, cooldown: float = COOLDOWN) -> None:
        if fallback_team not in supervisors:
            raise ValueError(f"fallback team {fallback_team!r} has no supervisor")
        self.links: tuple[Link, ...] = tuple(links)
        self.supervisors = dict(supervisors)
        self.fallback_team = fallback_team
        self.observer = observer
        self._clock = clock or (lambda: datetime.now(UTC))
        self._monotonic = monotonic
        self._max_failures = max_failures
        self._cooldown = cooldown
        self._health: dict[str, _Health] = {link.name: _Health() for link in self.links}
        self._threads = HookThreads(HOOK_THREADS, HOOK_THREADS_PER_PLUGIN)

    async def route(self, ticket: TicketView, message: MessageView, agents: Sequence[AgentView],
                    state: PluginStateStore, now: datetime | None = None) -> RoutingResult:
        """Runs the chain once for ``ticket``; never raises because of a plugin."""
        now = now or self._clock()
        run = _Run(
            team=ticket.team if ticket.team in self.supervisors else self.fallback_team,
            priority=ticket.priority,
            agents={a.name: a for a in agents},
            excluded=frozenset(ticket.lapsed_agents),
        )
        for link in self.links:
            picked = await self._call(link, run, ticket, message, state, now)
            if picked is not None:
                return self._finish(run, picked, link.name, None)
        return self._fall_back(run)

    async def _call(self, link: Link, run: _Run, ticket: TicketView, message: MessageView,
                    store: PluginStateStore, now: datetime) -> str | None:
        health = self._health[link.name]
        if health.skip_until > self._monotonic():
            run.trace.append(TraceStep(link.name, "skipped",
                                       f"cooling down after {health.failures} failures in a row", 0.0))
            return None
        context = PluginContext(
            name=link.name, team=run.team, priority=run.priority,
            agents=tuple(sorted(run.agents.values(), key=lambda a: a.name)),
            state=PluginState(store, link.name),
            logger=logging.getLogger(f"gatewayd.plugins.{link.name}"), clock_now=now)
        started = time.perf_counter()
        try:
            decision = await self._invoke(link, context, ticket, message, run.candidates())
            picked = self._apply(run, decision)
        except TimeoutError:
            self._fail(link, run, "timeout", f"no answer within {link.timeout:g}s", started)
            return None
        except _Garbage as exc:
            self._fail(link, run, "garbage", str(exc), started)
            return None
        except Exception as exc:
            log.error("routing plugin %s raised %s: %s", link.name, type(exc).__name__, exc,
                      exc_info=True, extra={"plugin": link.name})
            self._fail(link, run, "error", f"{type(exc).__name__}: {exc}", started)
            return None
        health.failures = 0
        run.trace.append(TraceStep(link.name, decision.outcome, decision.reason, _ms(started)))
        return picked

    async def _invoke(self, link: Link, context: PluginContext, ticket: TicketView, message: MessageView,
                      candidates: tuple[AgentView, ...]) -> Decision:
        """Calls the hook under its timeout; a ``def`` hook runs in a worker thread so a
        plugin that blocks (or hangs) can never stall the event loop that serves SMTP."""
        if inspect.iscoroutinefunction(link.plugin.route):
            task = asyncio.ensure_future(link.plugin.route(context, ticket, message, candidates))
        else:
            task = self._threads.run(link.name, link.plugin.route, context, ticket, message, candidates)
        done, _ = await asyncio.wait({task}, timeout=link.timeout)
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            raise TimeoutError
        result = task.result()
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise _Garbage("returned an awaitable from a def hook; declare the hook async def")
        if result is None:
            return Decision.abstain("no decision")
        if not isinstance(result, Decision):
            raise _Garbage(f"returned {type(result).__name__}, not a Decision")
        return result

    def _apply(self, run: _Run, decision: Decision) -> str | None:
        """Validates the whole decision first, so a bad one changes nothing."""
        team, subset = run.team, run.subset
        if decision.team is not None:
            if decision.team not in self.supervisors:
                raise _Garbage(f"narrowed to unknown team {decision.team!r}")
            team = decision.team
        if decision.agents is not None:
            subset = decision.agents if subset is None else subset & decision.agents
        if decision.agent is not None:
            bound = run.team_bound or decision.team is not None
            problem = self._unpickable(run, decision.agent, team if bound else None, subset)
            if problem:
                raise _Garbage(f"picked {decision.agent!r}, who {problem}")
        run.team_bound = run.team_bound or decision.team is not None
        run.team, run.subset = team, subset
        if decision.priority is not None:
            run.priority = decision.priority
        return decision.agent

    def _unpickable(self, run: _Run, name: str, team: str | None, subset: frozenset[str] | None) -> str | None:
        agent = run.agents.get(name)
        if agent is None:
            return "is not a known agent"
        if agent.away:
            return "is away"
        if name in run.excluded:
            return "already let this ticket lapse"
        if subset is not None and name not in subset:
            return "is not among the narrowed candidates"
        if team is not None and team not in agent.teams:
            return f"is not in team {team}"
        return None

    def _fail(self, link: Link, run: _Run, outcome: str, reason: str, started: float) -> None:
        if outcome != "error":
            log.warning("routing plugin %s: %s: %s", link.name, outcome, reason, extra={"plugin": link.name})
        health = self._health[link.name]
        health.failures += 1
        if health.failures >= self._max_failures:
            health.skip_until = self._monotonic() + self._cooldown
            log.error("routing plugin %s failed %d times in a row; skipping it for %gs",
                      link.name, health.failures, self._cooldown, extra={"plugin": link.name})
        if self.observer is not None:
            self.observer.plugin_error(link.name)
        run.trace.append(TraceStep(link.name, outcome, f"{reason} (treated as pass)", _ms(started)))

    def _fall_back(self, run: _Run) -> RoutingResult:
        pool = run.candidates()
        if pool:
            chosen = min(pool, key=lambda a: (a.open_tickets, a.name))
            run.trace.append(TraceStep("fallback", "fallback",
                                       f"no plugin picked; least-loaded available agent of team {run.team} "
                                       f"({chosen.open_tickets} open)", 0.0))
            return self._finish(run, chosen.name, "fallback", None)
        supervisor = self.supervisors[run.team]
        run.trace.append(TraceStep("fallback", "supervisor",
                                   f"no available agent in team {run.team}; sent to its supervisor {supervisor}",
                                   0.0))
        log.warning("no available agent in team %s; routing to supervisor %s", run.team, supervisor)
        return self._finish(run, None, "supervisor", supervisor)

    def _finish(self, run: _Run, agent: str | None, decided_by: str, supervisor: str | None) -> RoutingResult:
        team = run.team
        if agent is not None and team not in run.agents[agent].teams:
            team = run.agents[agent].teams[0] if run.agents[agent].teams else team
        if self.observer is not None:
            self.observer.routing_decision(decided_by, agent if agent is not None else "-")
        trace = tuple(run.trace)
        return RoutingResult(agent=agent, team=team, priority=run.priority, supervisor=supervisor, trace=trace,
                             summary=_summary(agent, supervisor, team, run.priority, decided_by, trace),
                             decided_by=decided_by)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _summary(agent: str | None, supervisor: str | None, team: str, priority: str, decided_by: str,
             trace: tuple[TraceStep, ...]) -> str:
    """One ASCII line for the ``X-Gatewayd-Route`` header."""
    owner = f"agent={agent}" if agent is not None else f"supervisor={supervisor}"
    steps = ",".join(f"{s.plugin}:{s.outcome}" for s in trace)
    text = f"{owner}; team={team}; priority={priority}; by={decided_by}; steps={steps}"
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= _SUMMARY_LIMIT else text[:_SUMMARY_LIMIT - 3] + "..."
