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

import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .store import AgentState, Store, TicketRecord, Tx, plugin_state_write, previous_agents


def _nothing_enqueued(result: Any) -> bool:
    return False


@dataclass(frozen=True)
class Planned:
    """One work item's writes, committed with the rest of its batch, and what follows once they are durable.

    ``after`` gets the result of ``write`` and answers whether something went
    into the outbox (the worker then wakes the outbox once for the batch).
    """

    write: Callable[[Tx], Awaitable[Any]]
    after: Callable[[Any], bool] = _nothing_enqueued


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

    def write_back(self) -> Callable[[Tx], Awaitable[None]] | None:
        """The write of every value set since the last write-back (None when there is none)."""
        if not self._dirty:
            return None
        changed = {slot: self._values[slot] for slot in sorted(self._dirty)}
        self._dirty.clear()

        async def write(tx: Tx) -> None:
            for (plugin, key), value in changed.items():
                await plugin_state_write(tx, plugin, key, value)
        return write


class BatchView:
    """The committed store plus the decisions of the batch in progress."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.plugin_state = CachedPluginState(store)
        self._tickets: dict[int, TicketRecord] = {}
        self._states: dict[str, AgentState] | None = None
        self._first: dict[int, int | None] = {}

    async def ticket(self, number: int) -> TicketRecord | None:
        if number in self._tickets:
            return self._tickets[number]
        return await self.store.ticket(number)

    async def first_message(self, ticket: int) -> int | None:
        if ticket not in self._first:
            self._first[ticket] = await self.store.first_message(ticket)
        return self._first[ticket]

    async def agent_states(self) -> dict[str, AgentState]:
        """Read once per batch (a snapshot, as every routing run's was), then kept current by :meth:`assign`."""
        if self._states is None:
            self._states = dict(await self.store.agent_states())
        return dict(self._states)

    async def customer_previous_agents(self, customer: str, exclude: int) -> tuple[str, ...]:
        mine = {n: t for n, t in self._tickets.items() if t.customer == customer and n != exclude}
        latest = await self.store.customer_agents(customer, (exclude, *mine))
        for number, ticket in mine.items():
            if ticket.agent is not None:
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
        self._tickets[ticket.number] = dataclasses.replace(ticket, agent=agent, team=team, priority=priority,
                                                           updated_at=now)


def _copy(value: Any) -> Any:
    return None if value is None else json.loads(json.dumps(value))
