"""Re-offering a ticket its agent let lapse (missed acknowledgement, out of office).

The lapsed agents of a ticket are the ``reoffered`` events in its audit trail,
so the routing chain's exclusion list and the accountability record cannot
disagree.
"""

from __future__ import annotations

from .store import Store, Tx, add_event


async def lapsed_agents(store: Store, ticket: int) -> tuple[str, ...]:
    rows = await store.fetchall(
        "SELECT DISTINCT json_extract(detail, '$.lapsed') FROM events WHERE ticket = ? AND kind = 'reoffered'",
        (ticket,))
    return tuple(sorted(r[0] for r in rows if r[0]))


async def reoffer(tx: Tx, ticket: int, agent: str, reason: str, now: float) -> bool:
    """Records the lapse and queues a routing run without ``agent``; False if the ticket moved on."""
    row = await tx.fetchone("SELECT agent, status FROM tickets WHERE number = ?", (ticket,))
    if row is None or row[0] != agent or row[1] != "open":
        return False
    if await _handled_since_routed(tx, ticket):
        return False
    first = await tx.fetchone("SELECT min(id) FROM messages WHERE ticket = ? AND direction = 'in'", (ticket,))
    await add_event(tx, ticket, "reoffered", {"lapsed": agent, "reason": reason}, actor="gatewayd", at=now)
    await tx.execute("INSERT INTO work (kind, ticket, message, created_at) VALUES ('reoffer', ?, ?, ?)",
                     (ticket, first[0] if first else None, now))
    return True


async def _handled_since_routed(tx: Tx, ticket: int) -> bool:
    """An ``acked``/``replied`` event after the routing to the current agent (read inside the transaction).

    The caller decided to re-offer from state read earlier; an ``#ack`` or reply
    committed in between wins. "Routed to the current agent" is what
    :func:`gatewayd.sla.clock_state` counts: a ``routed``/``reassigned`` event
    naming a different agent than the one before.
    """
    rows = await tx.fetchall(
        "SELECT kind, json_extract(detail, '$.agent') FROM events WHERE ticket = ? "
        "AND kind IN ('routed', 'reassigned', 'acked', 'replied') ORDER BY id", (ticket,))
    current: str | None = None
    handled = False
    for kind, who in rows:
        if kind in ("routed", "reassigned"):
            if who and who != current:
                current, handled = who, False
        else:
            handled = True
    return handled
