"""Enqueueing what gatewayd originates (replies, notices, alerts, webhooks) as outbox rows.

The row carries the whole message in ``head`` (``message`` NULL), or, for a
forward, gatewayd's header fields in ``head`` and the stored message it forwards
in ``message``. A retry sends the same bytes and Message-ID.
"""

from __future__ import annotations

from .store import Statement, Tx


async def enqueue(tx: Tx, *, kind: str, ticket: int | None, rcpt: str, mail_from: str, message_id: str,
                  content: bytes, now: float, agent: str | None = None, message: int | None = None) -> int:
    return await tx.execute(*enqueue_statement(kind=kind, ticket=ticket, rcpt=rcpt, mail_from=mail_from,
                                               message_id=message_id, content=content, now=now, agent=agent,
                                               message=message))


def enqueue_statement(*, kind: str, ticket: int | None, rcpt: str, mail_from: str, message_id: str, content: bytes,
                      now: float, agent: str | None = None, message: int | None = None) -> Statement:
    """:func:`enqueue` as a statement, for a :class:`~gatewayd.store.Writes`."""
    return ("INSERT INTO outbox (kind, ticket, message, agent, mail_from, rcpt, message_id, head, "
            "next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, ticket, message, agent, mail_from, rcpt, message_id, content, now, now, now))
