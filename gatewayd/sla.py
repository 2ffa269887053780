"""SLA clocks: acknowledgement and first response, from the ticket's audit trail.

Targets: ``sla.ack``/``sla.first_response``, replaced by the team's override,
then by the priority's (a high-priority ticket is the more specific promise).
Clocks count business time when a calendar applies (the team's, else the
top-level ``business_hours``), elapsed time otherwise.

The clock state is derived from events only, so a restart, the CLI and the
metrics all see the same thing:

* the ack clock starts when the ticket is routed to a (new) agent and stops at
  ``acked`` or ``replied``; when it runs out the ticket is re-offered;
* the response clock starts at creation, at a reopen, or at a customer
  follow-up while the ticket awaits the customer; it stops at ``replied``; when
  it runs out the ticket gets one ``overdue`` event and one alert.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .agent_mail import notice
from .config import Config
from .ids import TicketIds
from .outgoing import enqueue
from .reoffer import reoffer
from .store import EventRecord, Store, TicketRecord, Tx, add_event

if TYPE_CHECKING:
    from .business_hours import BusinessHours

log = logging.getLogger("gatewayd.sla")


@dataclass(frozen=True)
class Targets:
    ack: float
    first_response: float
    calendar: BusinessHours | None

    def due(self, start: float, seconds: float) -> float:
        if self.calendar is None:
            return start + seconds
        return self.calendar.add(datetime.fromtimestamp(start, timezone.utc), seconds).timestamp()


def targets(config: Config, team: str | None, priority: str) -> Targets:
    sla = config.sla
    ack, first, calendar = sla.ack, sla.first_response, config.business_hours
    for override in (sla.teams.get(team or ""), sla.priorities.get(priority)):
        if override is not None:
            ack = override.ack if override.ack is not None else ack
            first = override.first_response if override.first_response is not None else first
            calendar = override.business_hours or calendar
    return Targets(ack, first, calendar)


@dataclass(frozen=True)
class ClockState:
    agent: str | None
    routed_at: float | None
    acked_at: float | None
    reoffered: bool
    response_start: float
    replied_at: float | None
    overdue_at: float | None
    first_reply_at: float | None


def clock_state(ticket: TicketRecord, events: Iterable[EventRecord]) -> ClockState:
    agent: str | None = None
    routed_at = acked_at = replied_at = overdue_at = first_reply_at = None
    reoffered = False
    start = ticket.created_at
    for e in events:
        if e.kind in ("routed", "reassigned") and e.detail.get("agent") and e.detail.get("agent") != agent:
            agent, routed_at, acked_at, reoffered = e.detail["agent"], e.at, None, False
        elif e.kind == "reoffered":
            reoffered = True
        elif e.kind == "acked" and acked_at is None:
            acked_at = e.at
        elif e.kind == "replied":
            acked_at = acked_at if acked_at is not None else e.at
            replied_at = replied_at if replied_at is not None else e.at
            first_reply_at = first_reply_at if first_reply_at is not None else e.at
        elif e.kind == "followup_received" and replied_at is not None:
            start, replied_at, overdue_at = e.at, None, None
        elif e.kind == "reopened":
            start, replied_at, overdue_at = e.at, None, None
        elif e.kind == "overdue" and overdue_at is None:
            overdue_at = e.at
    return ClockState(agent, routed_at, acked_at, reoffered, start, replied_at, overdue_at, first_reply_at)


class SlaClock:
    """Scans open tickets every ``sla.scan_interval``; ``clock`` is injectable for tests."""

    def __init__(self, config: Callable[[], Config], store: Store, ids: TicketIds,
                 on_reoffer: Callable[[], None] = lambda: None, on_enqueued: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self.store = store
        self.ids = ids
        self.clock = clock
        self._on_reoffer = on_reoffer
        self._on_enqueued = on_enqueued
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.scan()
            except Exception:
                log.exception("SLA scan failed; trying again at the next interval")
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self._config().sla.scan_interval)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping.set()

    async def scan(self) -> tuple[int, int]:
        """One pass; returns (re-offered, newly overdue)."""
        config, now = self._config(), self.clock()
        reoffered = overdue = 0
        for ticket in await self.store.tickets(open_only=True, limit=100000):
            try:
                r, o = await self._check(config, ticket, now)
            except Exception:
                # One bad ticket (broken config reference, odd events) must not stop the others' clocks.
                log.exception("SLA check failed for ticket=%s; continuing with the others", self.ids.ref(ticket.number))
                continue
            reoffered += r
            overdue += o
        if reoffered:
            self._on_reoffer()
        if reoffered or overdue:
            self._on_enqueued()
        return reoffered, overdue

    async def _check(self, config: Config, ticket: TicketRecord, now: float) -> tuple[int, int]:
        """One ticket's clocks: (re-offered, newly overdue)."""
        reoffered = overdue = 0
        state = clock_state(ticket, await self.store.events(ticket.number))
        goal = targets(config, ticket.team, ticket.priority)
        if (state.agent is not None and state.agent == ticket.agent and state.routed_at is not None
                and state.acked_at is None and not state.reoffered
                and now >= goal.due(state.routed_at, goal.ack)):
            reoffered += await self._reoffer(config, ticket, state.agent, now)
        if (state.replied_at is None and state.overdue_at is None
                and now >= goal.due(state.response_start, goal.first_response)):
            overdue += await self._overdue(config, ticket, state, now)
        return reoffered, overdue

    async def _reoffer(self, config: Config, ticket: TicketRecord, agent: str, now: float) -> int:
        ref = self.ids.ref(ticket.number)
        address = config.agent(agent).address if config.agent(agent) else None
        content = None
        if address is not None:
            content = await asyncio.to_thread(
                notice, sender=config.support.addresses[0], rcpt=address, message_id=self.ids.message_id(ticket.number),
                subject=f"{self.ids.tag(ticket.number)} re-offered: not acknowledged in time", ticket=ref,
                text=f"{ref} was not acknowledged within its target and has been offered to another agent.\n"
                     "Nothing more is needed from you for it.")

        async def write(tx: Tx) -> bool:
            if not await reoffer(tx, ticket.number, agent, "ack_missed", now):
                return False
            if address is not None and content is not None:
                await enqueue(tx, kind="alert", ticket=ticket.number, rcpt=address,
                              mail_from=config.support.bounce_address, message_id=_message_id(content),
                              content=content, now=now, agent=agent)
            return True
        done = await self.store.transact(write)
        if done:
            log.info("ack missed ticket=%s agent=%s: re-offered", ref, agent)
        return int(done)

    async def _overdue(self, config: Config, ticket: TicketRecord, state: ClockState, now: float) -> int:
        ref = self.ids.ref(ticket.number)
        team = config.team(ticket.team or config.fallback.team) or config.teams[0]
        age = now - state.response_start
        content = await asyncio.to_thread(
            notice, sender=config.support.addresses[0], rcpt=team.supervisor,
            message_id=self.ids.message_id(ticket.number), ticket=ref,
            subject=f"{self.ids.tag(ticket.number)} overdue: no response to {ticket.customer}",
            text=(f"Ticket {ref} has had no response within its target.\n\n"
                  f"Subject:  {ticket.subject}\nCustomer: {ticket.customer}\nAge:      {_age(age)}\n"
                  f"Agent:    {ticket.agent or '(none)'}\nTeam:     {team.name}\nPriority: {ticket.priority}\n"))
        payload = json.dumps({"event": "ticket_overdue", "ticket": ref, "subject": ticket.subject,
                              "customer": ticket.customer, "agent": ticket.agent, "team": team.name,
                              "priority": ticket.priority, "age_seconds": round(age),
                              "since": state.response_start}, sort_keys=True).encode()

        async def write(tx: Tx) -> bool:
            # Another scan (or a reply) may have got here first: the state is re-read inside the transaction.
            row = await tx.fetchone(
                "SELECT kind FROM events WHERE ticket = ? AND kind IN ('overdue', 'replied', 'followup_received', "
                "'reopened') ORDER BY id DESC LIMIT 1", (ticket.number,))
            if row is not None and row[0] in ("overdue", "replied"):
                return False
            await add_event(tx, ticket.number, "overdue", {"age": round(age), "agent": ticket.agent,
                                                           "team": team.name}, actor="gatewayd", at=now)
            await enqueue(tx, kind="alert", ticket=ticket.number, rcpt=team.supervisor,
                          mail_from=config.support.bounce_address, message_id=_message_id(content),
                          content=content, now=now)
            if config.sla.webhook:
                await enqueue(tx, kind="webhook", ticket=ticket.number, rcpt=config.sla.webhook, mail_from="",
                              message_id=f"overdue-{ref}-{round(now)}", content=payload, now=now)
            return True
        done = await self.store.transact(write)
        if done:
            log.warning("ticket overdue ticket=%s agent=%s team=%s age=%s", ref, ticket.agent or "-", team.name,
                        _age(age))
        return int(done)


def _message_id(content: bytes) -> str:
    for line in content.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode("ascii")
    raise ValueError("notice without a Message-ID")


def _age(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m"
