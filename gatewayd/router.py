"""The routing worker: turns committed ``route`` work items into forwards.

It runs after the ``250``, from work rows written in the intake transaction,
so a slow or broken plugin can delay a forward but never lose a message or
its acceptance.

Items are taken in batches. Each item is decided in order (the plugin chain
runs for one item at a time, as ever) and its writes — owner, event with the
plugin trace, outbox row, work row marked done — wait for the batch's single
commit, each in a SAVEPOINT of its own so one failing item rolls back alone.
A :class:`~gatewayd.batch.BatchView` shows later items the decisions of earlier
ones (owners, loads, round-robin position). A crash before the commit simply
routes the batch again on restart.

``receipt`` work items (written by intake after a ticket's ``route`` item) go
to the :class:`~gatewayd.responder.Responder` in the same batches, so a
receipt is decided after the ticket is routed and can name its team. Work
kinds with handlers that commit on their own (agent replies, hand-overs) end
the batch before them: they read the store, so it must hold what came before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .batch import BatchView, Planned
from .compose import assemble, forward_head, header
from .config import Config
from .dispatch import RoutingChain, RoutingResult, TraceStep
from .errors import StoreError
from .ids import TicketIds
from .message_view import body_requested, message_view_from_bytes
from .metrics import Metrics
from .plugin import AgentView, MessageView, TicketView
from .reply_address import reply_addresses
from .responder import Responder
from .outgoing import enqueue_statement
from .store import (AgentState, Inbound, Statement, Store, TicketRecord, WorkItem, Writes, event_statement,
                    work_done_statement)

log = logging.getLogger("gatewayd.router")

_RETRY_AFTER_ERROR = 5.0
_MAX_FAILURES = 3
# A batch is committed after this many items or this long spent deciding them (once
# read and parsed), whichever comes first: big enough to share one commit, short
# enough that a slow plugin does not hold back the batch's first forward.
_BATCH_ITEMS = 64
_BATCH_SECONDS = 0.05


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


def reads_bodies(chain: RoutingChain) -> bool:
    """Whether a plugin of ``chain`` reads ``message.body`` (one that does not say counts as reading it)."""
    return any(getattr(link.plugin, "reads_body", True) for link in chain.links)


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
        self._stopping = False
        self._held: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._replies = reply_addresses(config.support.addresses, config.support.reply_secret)
        # Work kinds whose handlers commit on their own (agent replies), handled on this one
        # worker so everything that changes a ticket after intake happens in order. Receipts
        # and everything else ('route', 'reoffer') are decided in batches.
        self.handlers: dict[str, Callable[[WorkItem], Awaitable[None]]] = {}
        self.responder = Responder(config, store, ids, metrics)
        self._extract_bodies = reads_bodies(chain)

    def wake(self) -> None:
        self._wake.set()

    def reconfigure(self, config: Config, chain: RoutingChain) -> None:
        """Takes a reloaded config; the next work item uses it."""
        self.config = config
        self.chain = chain
        self.responder = Responder(config, self.store, self.ids, self.metrics)
        self._extract_bodies = reads_bodies(chain)

    async def plan_receipt(self, item: WorkItem, view: BatchView) -> Planned:
        return await self.responder.plan(item, view)

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            delay = 5.0
            try:
                if await self.work_through():
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

    async def work_through(self) -> bool:
        """Handles one batch of the pending work that is not held back; True if more may be waiting."""
        now = time.monotonic()
        self._held = {item: until for item, until in self._held.items() if until > now}
        items = await self.store.pending_work(limit=_BATCH_ITEMS, excluding=tuple(self._held))
        if not items:
            return False
        view = await self._prefetched(items)
        batch: list[tuple[WorkItem, Planned]] = []
        started = time.monotonic()
        for item in items:
            if self._stopping:
                break
            if item.kind in self.handlers:
                await self._commit(batch, view)
                batch, view = [], BatchView(self.store)
                await self._handle(item)
            else:
                planned = await self._plan(item, view)
                if planned is not None:
                    batch.append((item, planned))
            if time.monotonic() - started > _BATCH_SECONDS:
                break
        await self._commit(batch, view)
        return not self._stopping

    async def _prefetched(self, items: list[WorkItem]) -> BatchView:
        """A view of the store for ``items``, read in a few queries, their messages parsed in one trip to a thread."""
        view = BatchView(self.store)
        await view.prefetch(items)
        routed = {item.message for item in items if item.kind not in self.handlers and item.kind != "receipt"}
        inbound = [i for i in view.inbound_prefetched() if i.record.id in routed]

        def parse_all() -> dict[int, MessageView | Exception]:
            parsed: dict[int, MessageView | Exception] = {}
            for one in inbound:
                try:
                    parsed[one.record.id] = self._parse(one)
                except Exception as exc:
                    parsed[one.record.id] = exc
            return parsed
        if inbound:
            view.parsed.update(await asyncio.to_thread(parse_all))
        return view

    def _parse(self, inbound: Inbound) -> MessageView:
        """The message as plugins see it, with the ``Authentication-Results`` intake recorded; blocking.

        Its body is extracted here, off the loop, unless no plugin of the
        chain reads it: for a 100 KB message that was a third of the worker's CPU.
        """
        record, results = inbound.record, inbound.authentication_results
        seen = assemble(header("Authentication-Results", results), inbound.raw) if results else inbound.raw
        return message_view_from_bytes(seen, record.mail_from, record.rcpt_to, max_depth=self.config.limits.mime_depth,
                                       defer_body=not self._extract_bodies)

    async def _plan(self, item: WorkItem, view: BatchView) -> Planned | None:
        """Decides one item; None when it is held back (its failure counted) instead."""
        try:
            if item.kind == "receipt":
                return await self.plan_receipt(item, view)
            return await self.plan_route(item, view)
        except StoreError as exc:
            self._wait_for_store(item, exc)
        except Exception as exc:
            return self._failed(item, exc)
        return None

    async def _commit(self, batch: list[tuple[WorkItem, Planned]], view: BatchView | None) -> None:
        """Commits a batch's writes (and its plugin state) in one transaction, then runs each item's ``after``."""
        parts = [planned.write for _, planned in batch]
        state = view.plugin_state.write_back() if view is not None else None
        if state is not None:
            parts.append(state)
        if not parts:
            return
        try:
            outcomes = await self.store.transact_each(parts)
        except StoreError as exc:
            for item, _ in batch:
                self._wait_for_store(item, exc)
            return
        if state is not None and isinstance(outcomes[-1], Exception):
            log.error("plugin state of this batch was not saved: %s", outcomes[-1])
        enqueued = False
        given_up: list[tuple[WorkItem, Planned]] = []
        for (item, planned), outcome in zip(batch, outcomes):
            if isinstance(outcome, StoreError):
                self._wait_for_store(item, outcome)
            elif isinstance(outcome, Exception):
                if (give_up := self._failed(item, outcome)) is not None:
                    given_up.append((item, give_up))
            else:
                self._held.pop(item.id, None)
                self._failures.pop(item.id, None)
                enqueued = planned.after(outcome) or enqueued
        if enqueued:
            self._on_enqueued()
        if given_up:
            await self._commit(given_up, None)

    async def _handle(self, item: WorkItem) -> None:
        """Runs one item whose handler commits on its own, with the same failure rules as a batch's items."""
        try:
            await self.handlers[item.kind](item)
        except StoreError as exc:
            self._wait_for_store(item, exc)
            return
        except Exception as exc:
            if (give_up := self._failed(item, exc)) is not None:
                await self._commit([(item, give_up)], None)
            return
        self._held.pop(item.id, None)
        self._failures.pop(item.id, None)

    def _wait_for_store(self, item: WorkItem, exc: StoreError) -> None:
        """Store trouble is not the item's fault: retried for as long as it lasts."""
        log.warning("work item %d (%s) waits for the store: %s", item.id, item.kind, exc)
        self._held[item.id] = time.monotonic() + _RETRY_AFTER_ERROR

    def _failed(self, item: WorkItem, exc: Exception) -> Planned | None:
        """Holds a failing item back, never blocking the others; after ``_MAX_FAILURES`` tries sets it aside.

        Any failure other than the store's is a defect or hostile input: the
        item ends with a ``work_failed`` event (the message stays stored,
        visible in ``tickets show``) so the queue behind it keeps moving.
        """
        failures = self._failures.get(item.id, 0) + 1
        self._failures[item.id] = failures
        log.error("work item %d (%s) for ticket %s failed (%d of %d tries)", item.id, item.kind,
                  self.ids.ref(item.ticket), failures, _MAX_FAILURES, exc_info=exc)
        if failures < _MAX_FAILURES:
            self._held[item.id] = time.monotonic() + _RETRY_AFTER_ERROR * failures
            return None
        detail = {"work": item.id, "kind": item.kind, "message": item.message,
                  "error": f"{type(exc).__name__}: {exc}"[:300]}
        return Planned(Writes((event_statement(item.ticket, "work_failed", detail, actor="gatewayd"),
                               work_done_statement(item.id))))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def decide(self, ticket: TicketRecord, message: MessageView, followup: bool, view: BatchView) -> Routed:
        """Runs the chain (or keeps the owner of a follow-up) and says where the message goes."""
        agents = agent_views(self.config, await view.agent_states())
        owner = next((a for a in agents if a.name == ticket.agent), None)
        if followup and owner is not None and not owner.away:
            step = TraceStep("owner", "pick", f"follow-up stays with the ticket's owner {owner.name}", 0.0)
            return Routed(owner.address, owner.name, ticket.team, ticket.priority,
                          f"owner -> {owner.name}", (step,))
        view_of_ticket = TicketView(
            id=self.ids.ref(ticket.number), subject=ticket.subject, customer=ticket.customer,
            priority=ticket.priority, created_at=datetime.fromtimestamp(ticket.created_at, timezone.utc),
            team=ticket.team, agent=ticket.agent, is_followup=followup,
            lapsed_agents=await view.lapsed_agents(ticket.number),
            customer_previous_agents=await view.customer_previous_agents(ticket.customer, ticket.number))
        result: RoutingResult = await self.chain.route(view_of_ticket, message, agents, view.plugin_state)
        if result.agent is not None:
            address = next(a.address for a in agents if a.name == result.agent)
            return Routed(address, result.agent, result.team, result.priority, result.summary, result.trace)
        assert result.supervisor is not None
        return Routed(result.supervisor, None, result.team, result.priority, result.summary, result.trace)

    async def plan_route(self, item: WorkItem, view: BatchView) -> Planned:
        ticket = await view.ticket(item.ticket)
        inbound = await view.inbound(item.message) if item.message is not None else None
        if ticket is None or inbound is None:
            log.error("work item %d names a missing ticket or message; marking it done", item.id)
            return Planned(Writes((work_done_statement(item.id),)))
        record, raw, results = inbound.record, inbound.raw, inbound.authentication_results
        message = view.parsed.pop(record.id, None)
        if isinstance(message, Exception):
            raise message
        if message is None:
            message = await asyncio.to_thread(self._parse, inbound)
        deferred, chain = "body" not in vars(message), self.chain
        if deferred and self._extract_bodies:
            await asyncio.to_thread(getattr, message, "body")  # parsed before a reload or a plugin's surprise
            deferred = False
        followup = await view.first_message(ticket.number) != record.id
        routed = await self.decide(ticket, message, followup, view)
        if deferred and body_requested(message) and self.chain is chain and not self._extract_bodies:
            log.warning("a routing plugin read message.body though every plugin of the chain has "
                        "reads_body = False; extracting bodies before the chain runs until the next reload")
            self._extract_bodies = True
        message_id = self.ids.message_id(ticket.number)
        head = forward_head(self.ids, ticket.number, raw, agent=routed.agent or "(supervisor)",
                            message_id=message_id, route_summary=routed.summary,
                            reply_to=self._replies.for_agent(ticket.number, routed.agent) if routed.agent else None,
                            authentication_results=results)
        now = time.time()
        await view.assign(ticket, routed.agent, routed.team, routed.priority, now)
        statements: list[Statement] = []
        if routed.agent is not None and routed.agent != ticket.agent:
            statements += [("UPDATE tickets SET agent = ?, team = ?, priority = ?, updated_at = ? WHERE number = ?",
                            (routed.agent, routed.team, routed.priority, now, ticket.number)),
                           ("INSERT OR IGNORE INTO participants (ticket, address, role) VALUES (?, ?, 'agent')",
                            (ticket.number, routed.rcpt.lower()))]
        elif routed.agent is None:
            # With the supervisor nobody owns it: an agent who let it lapse must not keep it.
            statements.append(("UPDATE tickets SET agent = NULL, team = ?, priority = ?, updated_at = ? "
                               "WHERE number = ?", (routed.team, routed.priority, now, ticket.number)))
        statements += [
            event_statement(ticket.number, "routed" if routed.agent else "unroutable", {
                "message": record.id, "agent": routed.agent, "team": routed.team, "priority": routed.priority,
                "rcpt": routed.rcpt, "summary": routed.summary,
                "trace": [{"plugin": s.plugin, "outcome": s.outcome, "reason": s.reason, "ms": s.ms}
                          for s in routed.trace]}, at=now),
            enqueue_statement(kind="forward", ticket=ticket.number, message=record.id, agent=routed.agent,
                              mail_from=self.config.support.bounce_address, rcpt=routed.rcpt,
                              message_id=message_id, content=head, now=now),
            work_done_statement(item.id, now)]

        def after(_: None) -> bool:
            if not followup and routed.team and item.kind == "route":
                self.metrics.ticket_created(routed.team)
            log.info("routed ticket=%s agent=%s team=%s rcpt=<%s> route=%r", self.ids.ref(ticket.number),
                     routed.agent or "-", routed.team or "-", routed.rcpt, routed.summary)
            return True
        return Planned(Writes(tuple(statements)), after)
