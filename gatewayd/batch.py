"""A router batch: the store as the batch sees it, and each item's writes waiting for the one commit.

The router decides a batch of work items one after another and commits all
their writes together. Until that commit, the store's readers still show the
state before the batch, so :class:`BatchView` lays the batch's own decisions
over it: a ticket's new owner, the agents' open-ticket loads, the customer's
previous agents, and plugin state (:class:`CachedPluginState`, written back in
the batch's commit). A later item in the batch therefore decides exactly as if
the earlier ones were already committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .store import (AgentState, Inbound, Part, Store, TicketRecord, WorkItem, Writes, plugin_state_statement,
                    previous_agents)

# Messages up to this size are read with their batch; a bigger one is read when its item is decided.
PREFETCH_SIZE = 256 * 1024


def _nothing_enqueued(result: Any) -> bool:
    return False


@dataclass(frozen=True)
class Planned:
    """One work item's writes, committed with the rest of its batch, and what follows once they are durable.

    ``write`` is plain :class:`~gatewayd.store.Writes` when the item needs no
    reads inside the transaction (the cheap, common case), else a job. ``after``
    gets its result and answers whether something went into the outbox (the
    worker then wakes the outbox once for the batch).
    """

    write: Part
    after: Callable[[Any], bool] = _nothing_enqueued


async def commit_alone(store: Store, planned: Planned) -> Any:
    """Commits one planned item on its own and returns its result (raising its error)."""
    [outcome] = await store.transact_each([planned.write])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


class CachedPluginState:
    """Plugin state read through and written back: many routing runs, one write per key per batch.

    Values are copied in and out (JSON round trip), so a plugin mutating what
    it read cannot change the cache behind the API's back.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._values: dict[tuple[str, str], Any] = {}
        self._dirty: set[tuple[str, str]] = set()

    async def get(self, plugin: str, key: str) -> Any | None:
        slot = (plugin, key)
        if slot not in self._values:
            self._values[slot] = await self._store.plugin_state_get(plugin, key)
        return _copy(self._values[slot])

    async def set(self, plugin: str, key: str, value: Any) -> None:
        self._values[(plugin, key)] = _copy(value)
        self._dirty.add((plugin, key))

    def write_back(self) -> Writes | None:
        """The write of every value set since the last write-back (None when there is none)."""
        if not self._dirty:
            return None
        changed = tuple(plugin_state_statement(plugin, key, self._values[(plugin, key)])
                        for plugin, key in sorted(self._dirty))
        self._dirty.clear()
        return Writes(changed)


class BatchView:
    """The committed store plus the decisions of the batch in progress.

    :meth:`prefetch` reads what the batch's items need in a handful of queries
    (tickets, messages, first messages, lapses, the customers' agents, agent
    loads) instead of several round trips per item; whatever it did not read is
    read when asked for.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.plugin_state = CachedPluginState(store)
        self.parsed: dict[int, Any] = {}
        self._decided: dict[int, TicketRecord] = {}
        self._tickets: dict[int, TicketRecord] = {}
        self._inbound: dict[int, Inbound] = {}
        self._first: dict[int, int | None] = {}
        self._lapsed: dict[int, tuple[str, ...]] = {}
        self._batch: frozenset[int] = frozenset()
        self._customers: dict[str, dict[str, int]] = {}
        self._states: dict[str, AgentState] | None = None

    async def prefetch(self, items: Sequence[WorkItem]) -> None:
        tickets = frozenset(item.ticket for item in items)
        messages = {item.message for item in items if item.message is not None}
        store = self.store
        found, inbound, first, lapsed, states = await asyncio.gather(
            store.tickets_by_number(tickets), store.inbounds(messages, max_size=PREFETCH_SIZE),
            store.first_messages(tickets), store.lapsed_agents(tickets), store.agent_states())
        self._tickets, self._inbound, self._states = found, inbound, dict(states)
        self._first = {ticket: first.get(ticket) for ticket in tickets}
        self._lapsed = {ticket: lapsed.get(ticket, ()) for ticket in tickets}
        self._customers = await store.customers_agents({t.customer for t in found.values()}, tickets)
        self._batch = tickets

    def inbound_prefetched(self) -> list[Inbound]:
        return list(self._inbound.values())

    async def ticket(self, number: int) -> TicketRecord | None:
        if number in self._decided:
            return self._decided[number]
        if number in self._tickets:
            return self._tickets[number]
        return await self.store.ticket(number)

    async def inbound(self, message: int) -> Inbound | None:
        if message in self._inbound:
            return self._inbound[message]
        return await self.store.inbound(message)

    async def first_message(self, ticket: int) -> int | None:
        if ticket not in self._first:
            self._first[ticket] = await self.store.first_message(ticket)
        return self._first[ticket]

    async def lapsed_agents(self, ticket: int) -> tuple[str, ...]:
        if ticket not in self._lapsed:
            self._lapsed[ticket] = (await self.store.lapsed_agents((ticket,))).get(ticket, ())
        return self._lapsed[ticket]

    async def agent_states(self) -> dict[str, AgentState]:
        """Read once per batch (a snapshot, as every routing run's was), then kept current by :meth:`assign`."""
        if self._states is None:
            self._states = dict(await self.store.agent_states())
        return dict(self._states)

    async def customer_previous_agents(self, customer: str, exclude: int) -> tuple[str, ...]:
        if exclude in self._batch and exclude in self._tickets:
            # The prefetch read this customer's agents without the batch's tickets; add those as they are now.
            latest, others = dict(self._customers.get(customer, {})), self._batch - {exclude}
        else:
            others = frozenset(n for n, t in self._decided.items() if t.customer == customer and n != exclude)
            latest = await self.store.customer_agents(customer, (exclude, *others))
        for number in others:
            ticket = self._decided.get(number) or self._tickets.get(number)
            if ticket is not None and ticket.customer == customer and ticket.agent is not None:
                latest[ticket.agent] = max(latest.get(ticket.agent, number), number)
        return previous_agents(latest)

    async def assign(self, ticket: TicketRecord, agent: str | None, team: str | None, priority: str,
                     now: float) -> None:
        """Records a routing decision the batch will commit: the ticket's owner and the agents' loads."""
        if agent != ticket.agent and ticket.status == "open":
            states = await self.agent_states()
            for name, change in ((ticket.agent, -1), (agent, +1)):
                if name is not None:
                    state = states.get(name, AgentState(away=False, open_tickets=0))
                    states[name] = dataclasses.replace(state, open_tickets=max(0, state.open_tickets + change))
            self._states = states
        if agent is not None and agent == ticket.agent:
            return
        self._decided[ticket.number] = dataclasses.replace(ticket, agent=agent, team=team, priority=priority,
                                                           updated_at=now)


def _copy(value: Any) -> Any:
    return None if value is None else json.loads(json.dumps(value))
