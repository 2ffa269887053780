"""Threading: which existing ticket, if any, an inbound message belongs to.

The rules, first match wins:

1. ``In-Reply-To``/``References`` names one of gatewayd's own signed
   Message-IDs — from anyone, since only gatewayd can mint them.
2. ``References``/``In-Reply-To`` names a Message-ID stored on a ticket, or
   gatewayd's pseudo-reference ``<SUP-1042@host>``, and the sender already
   takes part in that ticket.
3. The subject carries ``[SUP-1042]`` and the sender takes part in it.

Subject text alone never threads, and a stranger quoting someone else's tag
opens a ticket of their own: a tag is guessable, participation is not.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .ids import TicketIds, message_ids
from .rawmessage import HeaderSummary, decoded_text
from .store import Tx


@dataclass(frozen=True)
class Match:
    ticket: int
    rule: str


async def find_ticket(tx: Tx, ids: TicketIds, headers: HeaderSummary, senders: Collection[str]) -> Match | None:
    refs = message_ids(headers.in_reply_to) + message_ids(headers.references)
    for ref in refs:
        number = ids.ticket_of_message_id(ref)
        if number is not None and await _exists(tx, number):
            return Match(number, "gatewayd-message-id")
    for ref in refs:
        number = ids.ticket_of_pseudo_reference(ref)
        if number is not None and await _participant(tx, number, senders):
            return Match(number, "pseudo-reference")
    if refs:
        marks = ",".join("?" * len(refs))
        rows = await tx.fetchall(
            f"SELECT ticket FROM messages WHERE message_id IN ({marks}) AND ticket IS NOT NULL "
            "GROUP BY ticket ORDER BY max(id) DESC", refs)
        for row in rows:
            if await _participant(tx, row[0], senders):
                return Match(row[0], "references")
    # The tag is looked for in the decoded subject: clients routinely encode a whole
    # non-ASCII subject, tag included (``=?utf-8?q?Re=3A_=5BSUP-1042=5D_Caf=C3=A9?=``).
    for number in ids.tags_in(decoded_text(headers.subject)):
        if await _participant(tx, number, senders):
            return Match(number, "subject-tag")
    return None


async def _exists(tx: Tx, number: int) -> bool:
    return await tx.fetchone("SELECT 1 FROM tickets WHERE number = ?", (number,)) is not None


async def _participant(tx: Tx, number: int, senders: Collection[str]) -> bool:
    if not senders:
        return False
    marks = ",".join("?" * len(senders))
    row = await tx.fetchone(
        f"SELECT 1 FROM participants WHERE ticket = ? AND address IN ({marks})", (number, *senders))
    return row is not None
