"""Enqueueing what gatewayd originates (replies, notices, alerts, webhooks) as outbox rows.

The row carries the whole message in ``head`` (``message`` NULL), so the
outbox sends it as is and a retry sends the same bytes and Message-ID.
"""

from __future__ import annotations

from .store import Tx


async def enqueue(tx: Tx, *, kind: str, ticket: int | None, rcpt: str, mail_from: str, message_id: str,
                  content: bytes, now: float, agent: str | None = None) -> int:
    return await tx.execute(
        "INSERT INTO outbox (kind, ticket, message, agent, mail_from, rcpt, message_id, head, "
        "next_attempt_at, created_at, updated_at) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
        (kind, ticket, agent, mail_from, rcpt, message_id, content, now, now, now))
