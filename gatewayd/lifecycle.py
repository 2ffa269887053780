"""What a customer message does to a closed ticket: reopen it, or start a linked one.

A reply soon after closing ("thanks, but it still fails") belongs to the same
case; one months later is a new case that merely quotes the old thread. The
boundary is ``sla.reopen_window``, counted from the close.
"""

from __future__ import annotations

from .store import Tx, add_event


async def thread_onto(tx: Tx, ticket: int, now: float, window: float, actor: str) -> bool:
    """Whether a customer message joins ``ticket``; a closed one within the window is reopened."""
    row = await tx.fetchone("SELECT status FROM tickets WHERE number = ?", (ticket,))
    if row is None:
        return False
    if row[0] != "closed":
        return True
    closed = await tx.fetchone(
        "SELECT max(at) FROM events WHERE ticket = ? AND kind = 'closed'", (ticket,))
    closed_at = closed[0] if closed and closed[0] is not None else 0.0
    if now - closed_at > window:
        return False
    await tx.execute("UPDATE tickets SET status = 'open', updated_at = ? WHERE number = ?", (now, ticket))
    await add_event(tx, ticket, "reopened", {"by": "customer reply", "closed_at": closed_at}, actor=actor, at=now)
    return True


async def link(tx: Tx, previous: int, new: int, now: float, previous_ref: str, new_ref: str) -> None:
    """Both tickets name each other, so ``tickets show`` leads from one to the other."""
    await add_event(tx, new, "linked", {"previous": previous_ref}, actor="gatewayd", at=now)
    await add_event(tx, previous, "continued_in", {"ticket": new_ref}, actor="gatewayd", at=now)
