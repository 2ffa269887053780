"""The routing worker: turns committed ``route`` work items into forwards.

It runs after the ``250``, from work rows written in the intake transaction,
so a slow or broken plugin can delay a forward but never lose a message or
its acceptance. Each item is finished in one transaction: owner, event with
the plugin trace, outbox row, work row marked done. A crash in between simply
routes the item again on restart.

``receipt`` work items (written by intake after a ticket's ``route`` item) go
to the :class:`~gatewayd.responder.Responder` on this same worker, so a
receipt is decided after the ticket is routed and can name its team.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .compose import assemble, forward_head, header
from .config import Config
from .dispatch import RoutingChain, RoutingResult, TraceStep
from .errors import StoreError
from .ids import TicketIds
from .message_view import message_view_from_bytes
from .metrics import Metrics
from .plugin import AgentView, MessageView, TicketView
from .reoffer import lapsed_agents
from .reply_address import reply_addresses
from .responder import Responder
from .outgoing import enqueue
from .store import AgentState, Store, TicketRecord, Tx, WorkItem, add_event, work_done

log = logging.getLogger("gatewayd.router")

_RETRY_AFTER_ERROR = 5.0
_MAX_FAILURES = 3


class StorePluginState:
    """Plugins' persistent state (e.g. round-robin position) kept in the store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, plugin: str, key: str) -> Any | None:
        return await self._store.plugin_state_get(plugin, key)

    async def set(self, plugin: str, key: str, value: Any) -> None:
        await self._store.plugin_state_set(plugin, key, value)


def agent_views(config: Config, states: Mapping[str, AgentState]) -> list[AgentView]:
    """Configured agents joined with their live state; agents the store never saw have no load."""
    views = []
    for agent in config.agents:
        state = states.get(agent.name)
        views.append(AgentView(name=agent.name, address=agent.address, teams=agent.teams,
                               timezone=agent.timezone, away=bool(state and state.away),
                               open_tickets=state.open_tickets if state else 0))
    return views


@dataclass(frozen=True)
class Routed:
    """Where one message went: an agent, or the supervisor when nobody was available."""

    rcpt: str
    agent: str | None
    team: str | None
    priority: str
    summary: str
    trace: tuple[TraceStep, ...]


class Router:
    def __init__(self, config: Config, store: Store, ids: TicketIds, chain: RoutingChain, metrics: Metrics,
                 on_enqueued: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.store = store
        self.ids = ids
        self.chain = chain
        self.metrics = metrics
        self._on_enqueued = on_enqueued
        self._wake = asyncio.Event()
        self._state = StorePluginState(store)
        self._stopping = False
        self._held: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._replies = reply_addresses(config.support.addresses, config.support.reply_secret)
        # Work kinds other than 'route' (agent replies, re-offers) handled on this one worker,
        # so everything that changes a ticket after intake happens in order.
        self.handlers: dict[str, Callable[[WorkItem], Awaitable[None]]] = {"reoffer": self.route,
                                                                            "receipt": self.receipt}
        self.responder = Responder(config, store, ids, metrics)

    def wake(self) -> None:
        self._wake.set()

    def reconfigure(self, config: Config, chain: RoutingChain) -> None:
        """Takes a reloaded config; the next work item uses it."""
        self.config = config
        self.chain = chain
        self.responder = Responder(config, self.store, self.ids, self.metrics)

    async def receipt(self, item: WorkItem) -> None:
        if await self.responder.handle(item):
            self._on_enqueued()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            delay = 5.0
            try:
                progressed = False
                for item in await self.store.pending_work(limit=100):
                    if self._stopping:
                        return
                    if self._held.get(item.id, 0.0) <= time.monotonic():
                        progressed = await self._handle(item) or progressed
                if progressed and await self.store.pending_work(limit=1):
                    continue
                if self._held:
                    delay = max(0.05, min(delay, min(self._held.values()) - time.monotonic()))
            except Exception:
                log.exception("reading the work queue failed; retrying in %.0fs", _RETRY_AFTER_ERROR)
                delay = _RETRY_AFTER_ERROR
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def _handle(self, item: WorkItem) -> bool:
        """Runs one work item; a failing item is held back and retried, never blocking the others.

        Store trouble is retried for as long as it lasts. Any other failure is a
        defect or hostile input: after ``_MAX_FAILURES`` tries the item is set
        aside with a ``work_failed`` event (the message stays stored, visible in
        ``tickets show``) so the queue behind it keeps moving.
        """
        try:
            await self.handlers.get(item.kind, self.route)(item)
        except StoreError as exc:
            log.warning("work item %d (%s) waits for the store: %s", item.id, item.kind, exc)
            self._held[item.id] = time.monotonic() + _RETRY_AFTER_ERROR
            return False
        except Exception as exc:
            failures = self._failures.get(item.id, 0) + 1
            self._failures[item.id] = failures
            log.exception("work item %d (%s) for ticket %s failed (%d of %d tries)",
                          item.id, item.kind, self.ids.ref(item.ticket), failures, _MAX_FAILURES)
            if failures < _MAX_FAILURES:
                self._held[item.id] = time.monotonic() + _RETRY_AFTER_ERROR * failures
                return False
            detail = {"work": item.id, "kind": item.kind, "message": item.message,
                      "error": f"{type(exc).__name__}: {exc}"[:300]}

            async def give_up(tx: Tx) -> None:
                await add_event(tx, item.ticket, "work_failed", detail, actor="gatewayd")
                await work_done(tx, item.id)
            await self.store.transact(give_up)
        self._held.pop(item.id, None)
        self._failures.pop(item.id, None)
        return True

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def agents(self) -> list[AgentView]:
        return agent_views(self.config, await self.store.agent_states())

    async def decide(self, ticket: TicketRecord, message: MessageView, followup: bool) -> Routed:
        """Runs the chain (or keeps the owner of a follow-up) and says where the message goes."""
        agents = await self.agents()
        owner = next((a for a in agents if a.name == ticket.agent), None)
        if followup and owner is not None and not owner.away:
            step = TraceStep("owner", "pick", f"follow-up stays with the ticket's owner {owner.name}", 0.0)
            return Routed(owner.address, owner.name, ticket.team, ticket.priority,
                          f"owner -> {owner.name}", (step,))
        view = TicketView(
            id=self.ids.ref(ticket.number), subject=ticket.subject, customer=ticket.customer,
            priority=ticket.priority, created_at=datetime.fromtimestamp(ticket.created_at, timezone.utc),
            team=ticket.team, agent=ticket.agent, is_followup=followup,
            lapsed_agents=await lapsed_agents(self.store, ticket.number),
            customer_previous_agents=await self.store.customer_previous_agents(ticket.customer, ticket.number))
        result: RoutingResult = await self.chain.route(view, message, agents, self._state)
        if result.agent is not None:
            address = next(a.address for a in agents if a.name == result.agent)
            return Routed(address, result.agent, result.team, result.priority, result.summary, result.trace)
        assert result.supervisor is not None
        return Routed(result.supervisor, None, result.team, result.priority, result.summary, result.trace)

    async def route(self, item: WorkItem) -> None:
        ticket = await self.store.ticket(item.ticket)
        record = await self.store.message(item.message) if item.message is not None else None
        if ticket is None or record is None:
            log.error("work item %d names a missing ticket or message; marking it done", item.id)
            await self.store.transact(lambda tx: work_done(tx, item.id))
            return
        raw = await self.store.message_raw(record.id)
        results = await self._authentication_results(record.id)
        seen = assemble(header("Authentication-Results", results), raw) if results else raw
        message = await asyncio.to_thread(message_view_from_bytes, seen, record.mail_from, record.rcpt_to,
                                          max_depth=self.config.limits.mime_depth)
        followup = await self.store.first_message(ticket.number) != record.id
        routed = await self.decide(ticket, message, followup)
        message_id = self.ids.message_id(ticket.number)
        head = forward_head(self.ids, ticket.number, raw, agent=routed.agent or "(supervisor)",
                            message_id=message_id, route_summary=routed.summary,
                            reply_to=self._replies.for_agent(ticket.number, routed.agent) if routed.agent else None,
                            authentication_results=results)
        now = time.time()

        async def commit(tx: Tx) -> None:
            if routed.agent is not None and routed.agent != ticket.agent:
                await tx.execute("UPDATE tickets SET agent = ?, team = ?, priority = ?, updated_at = ? "
                                 "WHERE number = ?", (routed.agent, routed.team, routed.priority, now, ticket.number))
                await tx.execute("INSERT OR IGNORE INTO participants (ticket, address, role) VALUES (?, ?, 'agent')",
                                 (ticket.number, routed.rcpt.lower()))
            elif routed.agent is None:
                # With the supervisor nobody owns it: an agent who let it lapse must not keep it.
                await tx.execute("UPDATE tickets SET agent = NULL, team = ?, priority = ?, updated_at = ? "
                                 "WHERE number = ?", (routed.team, routed.priority, now, ticket.number))
            await add_event(tx, ticket.number, "routed" if routed.agent else "unroutable", {
                "message": record.id, "agent": routed.agent, "team": routed.team, "priority": routed.priority,
                "rcpt": routed.rcpt, "summary": routed.summary,
                "trace": [{"plugin": s.plugin, "outcome": s.outcome, "reason": s.reason, "ms": s.ms}
                          for s in routed.trace]}, at=now)
            await enqueue(tx, kind="forward", ticket=ticket.number, message=record.id, agent=routed.agent,
                          mail_from=self.config.support.bounce_address, rcpt=routed.rcpt, message_id=message_id,
                          content=head, now=now)
            await work_done(tx, item.id, now)

        await self.store.transact(commit)
        if not followup and routed.team and item.kind == "route":
            self.metrics.ticket_created(routed.team)
        log.info("routed ticket=%s agent=%s team=%s rcpt=<%s> route=%r", self.ids.ref(ticket.number),
                 routed.agent or "-", routed.team or "-", routed.rcpt, routed.summary)
        self._on_enqueued()


    async def _authentication_results(self, message: int) -> str | None:
        """The ``Authentication-Results`` value intake recorded for ``message`` (None before migration 3)."""
        row = await self.store.fetchone("SELECT auth FROM messages WHERE id = ?", (message,))
        return json.loads(row[0]).get("header") if row and row[0] else None

