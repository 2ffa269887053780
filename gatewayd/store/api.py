"""The store's domain operations: typed records in, typed records out.

SQL that belongs to one decision (intake's threading, the outbox's state
machine) lives beside that decision as a :class:`Tx` job; what many parts read
(tickets, events, the outbox listing, agent state) lives here.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from .db import Database, Statement, Tx


@dataclass(frozen=True)
class TicketRecord:
    number: int
    subject: str
    customer: str
    status: str
    priority: str
    team: str | None
    agent: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class EventRecord:
    id: int
    ticket: int | None
    at: float
    kind: str
    actor: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class MessageRecord:
    id: int
    ticket: int | None
    direction: str
    listener: str | None
    mail_from: str
    rcpt_to: tuple[str, ...]
    message_id: str | None
    size: int
    received_at: float


@dataclass(frozen=True)
class OutboxItem:
    id: int
    kind: str
    ticket: int | None
    message: int | None
    agent: str | None
    mail_from: str
    rcpt: str
    message_id: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float


@dataclass(frozen=True)
class Inbound:
    """A stored message with its raw bytes and the authentication verdict intake recorded (None: none)."""

    record: MessageRecord
    raw: bytes
    auth: dict[str, Any] | None

    @property
    def authentication_results(self) -> str | None:
        """The ``Authentication-Results`` value intake recorded."""
        return self.auth.get("header") if self.auth else None


@dataclass(frozen=True)
class WorkItem:
    id: int
    kind: str
    ticket: int
    message: int | None


@dataclass(frozen=True)
class AgentState:
    away: bool
    open_tickets: int
    reason: str | None = None


_TICKET_COLUMNS = "number, subject, customer, status, priority, team, agent, created_at, updated_at"
_OUTBOX_COLUMNS = ("id, kind, ticket, message, agent, mail_from, rcpt, message_id, state, attempts, "
                   "next_attempt_at, last_error, created_at")


def _message_records(rows: list[Any]) -> list[MessageRecord]:
    return [MessageRecord(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), r[6], r[7], r[8]) for r in rows]


async def add_event(tx: Tx, ticket: int | None, kind: str, detail: dict[str, Any] | None = None,
                    actor: str | None = None, at: float | None = None) -> int:
    """Appends to the audit trail; every state change of a ticket writes one."""
    return await tx.execute(*event_statement(ticket, kind, detail, actor, at))


def event_statement(ticket: int | None, kind: str, detail: dict[str, Any] | None = None,
                    actor: str | None = None, at: float | None = None) -> Statement:
    """:func:`add_event` as a statement, for :class:`Writes`."""
    return ("INSERT INTO events (ticket, at, kind, actor, detail) VALUES (?, ?, ?, ?, ?)",
            (ticket, at if at is not None else time.time(), kind, actor,
             json.dumps(detail or {}, sort_keys=True, ensure_ascii=False)))


# A ticket is overdue while it is open and its latest SLA event is ``overdue``
# (the SLA clock writes it when the first response is missed; a ``replied`` or ``reopened`` event
# ends the state, as in sla.clock_state). The gauge, ``tickets list --overdue`` and the report all use it.
_OVERDUE_SQL = """
    SELECT t.number, coalesce(t.team, ''), coalesce(t.agent, '') FROM tickets t
    WHERE t.status = 'open'
      AND (SELECT e.kind FROM events e
           WHERE e.ticket = t.number AND e.kind IN ('overdue', 'replied', 'reopened')
           ORDER BY e.id DESC LIMIT 1) = 'overdue'
"""


def plugin_state_statement(plugin: str, key: str, value: Any) -> Statement:
    return ("INSERT INTO plugin_state (plugin, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
            (plugin, key, json.dumps(value, sort_keys=True)))


async def work_done(tx: Tx, work: int, now: float | None = None) -> None:
    """Marks a work item finished; done in the same transaction as the item's effect."""
    await tx.execute(*work_done_statement(work, now))


def work_done_statement(work: int, now: float | None = None) -> Statement:
    return ("UPDATE work SET done_at = ? WHERE id = ?", (now if now is not None else time.time(), work))


class RecentRaw:
    """The bytes of recently read messages, up to a budget: the router reads a message and the outbox
    sends it moments later, and a stored message never changes, so the second read can be skipped."""

    def __init__(self, budget: int = 16 * 1024 * 1024) -> None:
        self._budget = budget
        self._size = 0
        self._raws: OrderedDict[int, bytes] = OrderedDict()

    def get(self, message: int) -> bytes | None:
        raw = self._raws.get(message)
        if raw is not None:
            self._raws.move_to_end(message)
        return raw

    def put(self, message: int, raw: bytes) -> None:
        if len(raw) > self._budget // 4 or message in self._raws:
            return
        self._raws[message] = raw
        self._size += len(raw)
        while self._size > self._budget:
            _, dropped = self._raws.popitem(last=False)
            self._size -= len(dropped)


class Store(Database):
    """The gatewayd store. ``await Store.open(path)`` creates or upgrades it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.recent = RecentRaw()

    async def overdue(self) -> list[tuple[int, str, str]]:
        """``(ticket, team, agent)`` of every overdue ticket; team/agent are '' when unset."""
        return [(r[0], r[1], r[2]) for r in await self.fetchall(_OVERDUE_SQL)]

    async def ticket(self, number: int) -> TicketRecord | None:
        row = await self.fetchone(f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE number = ?", (number,))
        return TicketRecord(*row) if row else None

    async def tickets(self, *, open_only: bool = False, limit: int = 1000) -> list[TicketRecord]:
        where = "WHERE status = 'open'" if open_only else ""
        rows = await self.fetchall(
            f"SELECT {_TICKET_COLUMNS} FROM tickets {where} ORDER BY number DESC LIMIT ?", (limit,))
        return [TicketRecord(*row) for row in rows]

    async def events(self, ticket: int) -> list[EventRecord]:
        rows = await self.fetchall(
            "SELECT id, ticket, at, kind, actor, detail FROM events WHERE ticket = ? ORDER BY id", (ticket,))
        return [EventRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    async def messages(self, ticket: int) -> list[MessageRecord]:
        rows = await self.fetchall(
            "SELECT id, ticket, direction, listener, mail_from, rcpt_to, message_id, size, received_at "
            "FROM messages WHERE ticket = ? ORDER BY id", (ticket,))
        return _message_records(rows)

    async def message(self, message: int) -> MessageRecord | None:
        rows = await self.fetchall(
            "SELECT id, ticket, direction, listener, mail_from, rcpt_to, message_id, size, received_at "
            "FROM messages WHERE id = ?", (message,))
        return _message_records(rows)[0] if rows else None

    async def inbound(self, message: int) -> Inbound | None:
        """One read for what routing and receipts need of a message."""
        return (await self.inbounds((message,))).get(message)

    async def inbounds(self, messages: Collection[int], max_size: int | None = None) -> dict[int, Inbound]:
        """:meth:`inbound` for many messages in one read; ``max_size`` leaves bigger ones out."""
        marks = ",".join("?" * len(messages))
        rows = await self.fetchall(
            "SELECT id, ticket, direction, listener, mail_from, rcpt_to, message_id, size, received_at, raw, auth "
            f"FROM messages WHERE id IN ({marks}) AND size <= ?",
            (*messages, max_size if max_size is not None else 2**62))
        found = {row[0]: Inbound(_message_records([row[:9]])[0], bytes(row[9]),
                                 json.loads(row[10]) if row[10] else None) for row in rows}
        for number, inbound in found.items():
            self.recent.put(number, inbound.raw)
        return found

    async def tickets_by_number(self, numbers: Collection[int]) -> dict[int, TicketRecord]:
        marks = ",".join("?" * len(numbers))
        rows = await self.fetchall(f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE number IN ({marks})", tuple(numbers))
        return {row[0]: TicketRecord(*row) for row in rows}

    async def first_message(self, ticket: int) -> int | None:
        return (await self.first_messages((ticket,))).get(ticket)

    async def first_messages(self, tickets: Collection[int]) -> dict[int, int]:
        """The first stored message of each ticket (tickets without one are left out)."""
        marks = ",".join("?" * len(tickets))
        rows = await self.fetchall(
            f"SELECT ticket, min(id) FROM messages WHERE ticket IN ({marks}) GROUP BY ticket", tuple(tickets))
        return {row[0]: row[1] for row in rows}

    async def lapsed_agents(self, tickets: Collection[int]) -> dict[int, tuple[str, ...]]:
        """The agents who let each ticket lapse (its ``reoffered`` events, as :mod:`gatewayd.reoffer` writes them)."""
        marks = ",".join("?" * len(tickets))
        rows = await self.fetchall(
            f"SELECT DISTINCT ticket, json_extract(detail, '$.lapsed') FROM events WHERE ticket IN ({marks}) "
            "AND kind = 'reoffered'", tuple(tickets))
        lapsed: dict[int, list[str]] = {}
        for ticket, agent in rows:
            if agent:
                lapsed.setdefault(ticket, []).append(agent)
        return {ticket: tuple(sorted(agents)) for ticket, agents in lapsed.items()}

    async def message_raw(self, message: int) -> bytes:
        row = await self.fetchone("SELECT raw FROM messages WHERE id = ?", (message,))
        if row is None:
            raise KeyError(f"message {message} is not in the store")
        return bytes(row[0])

    async def outbox(self, *, states: tuple[str, ...] = ("pending", "failed"),
                     limit: int = 1000) -> list[OutboxItem]:
        marks = ",".join("?" * len(states))
        rows = await self.fetchall(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state IN ({marks}) ORDER BY id LIMIT ?",
            (*states, limit))
        return [OutboxItem(*row) for row in rows]

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        rows = await self.fetchall(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
            "ORDER BY next_attempt_at, id LIMIT ?", (now, limit))
        return [OutboxItem(*row) for row in rows]

    async def next_outbox_due(self, excluding: Collection[int] = ()) -> float | None:
        marks = ",".join("?" * len(excluding))
        row = await self.fetchone(
            f"SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending' AND id NOT IN ({marks})",
            tuple(excluding))
        return row[0] if row else None

    async def outbox_parts(self, item: int, message: int | None = None) -> tuple[bytes, bytes | None]:
        """gatewayd's head and the raw bytes of ``message``, which it forwards (None when head is all)."""
        raw = self.recent.get(message) if message is not None else None
        if raw is not None:
            row = await self.fetchone("SELECT head FROM outbox WHERE id = ?", (item,))
            if row is None:
                raise KeyError(f"outbox item {item} is not in the store")
            return bytes(row[0]), raw
        row = await self.fetchone(
            "SELECT o.head, m.raw FROM outbox o LEFT JOIN messages m ON m.id = o.message WHERE o.id = ?", (item,))
        if row is None:
            raise KeyError(f"outbox item {item} is not in the store")
        return bytes(row[0]), (bytes(row[1]) if row[1] is not None else None)

    async def pending_work(self, limit: int = 100, excluding: Collection[int] = ()) -> list[WorkItem]:
        """The oldest unfinished work items, skipping ``excluding`` (items held back after a failure)."""
        marks = ",".join("?" * len(excluding))
        rows = await self.fetchall(
            f"SELECT id, kind, ticket, message FROM work WHERE done_at IS NULL AND id NOT IN ({marks}) "
            "ORDER BY id LIMIT ?", (*excluding, limit))
        return [WorkItem(*row) for row in rows]

    async def agent_states(self) -> dict[str, AgentState]:
        """Away flags and open-ticket counts for every agent the store knows of."""
        load = {r[0]: r[1] for r in await self.fetchall(
            "SELECT agent, count(*) FROM tickets WHERE status = 'open' AND agent IS NOT NULL GROUP BY agent")}
        flags = {r[0]: (bool(r[1]), r[2]) for r in await self.fetchall(
            "SELECT name, away, reason FROM agent_state")}
        return {name: AgentState(away=flags.get(name, (False, None))[0], open_tickets=load.get(name, 0),
                                 reason=flags.get(name, (False, None))[1])
                for name in set(load) | set(flags)}

    async def set_agent_away(self, name: str, away: bool, reason: str) -> None:
        async def write(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO agent_state (name, away, reason, changed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET away = excluded.away, reason = excluded.reason, "
                "changed_at = excluded.changed_at", (name, int(away), reason, time.time()))
            await add_event(tx, None, "agent_away" if away else "agent_back", {"agent": name, "reason": reason})
        await self.transact(write)

    async def customer_previous_agents(self, customer: str, exclude: int) -> tuple[str, ...]:
        return previous_agents(await self.customer_agents(customer, (exclude,)))

    async def customer_agents(self, customer: str, excluding: Collection[int]) -> dict[str, int]:
        """Every agent owning one of ``customer``'s tickets (``excluding`` those), with the newest one's number."""
        return (await self.customers_agents((customer,), excluding)).get(customer, {})

    async def customers_agents(self, customers: Collection[str],
                               excluding: Collection[int]) -> dict[str, dict[str, int]]:
        """:meth:`customer_agents` for many customers in one read."""
        marks, skip = ",".join("?" * len(customers)), ",".join("?" * len(excluding))
        rows = await self.fetchall(
            f"SELECT customer, agent, max(number) FROM tickets WHERE customer IN ({marks}) "
            f"AND number NOT IN ({skip}) AND agent IS NOT NULL GROUP BY customer, agent",
            (*customers, *excluding))
        found: dict[str, dict[str, int]] = {}
        for customer, agent, number in rows:
            found.setdefault(customer, {})[agent] = number
        return found

    async def plugin_state_get(self, plugin: str, key: str) -> Any | None:
        row = await self.fetchone("SELECT value FROM plugin_state WHERE plugin = ? AND key = ?", (plugin, key))
        return json.loads(row[0]) if row else None

    async def plugin_state_set(self, plugin: str, key: str, value: Any) -> None:
        statement = plugin_state_statement(plugin, key, value)
        await self.transact(lambda tx: tx.execute(*statement))


def previous_agents(latest: dict[str, int]) -> tuple[str, ...]:
    """Agents ordered by their newest ticket, newest first (the order ``customer_previous_agents`` promises)."""
    return tuple(sorted(latest, key=lambda agent: latest[agent], reverse=True))
