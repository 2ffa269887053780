"""Intake: from an accepted SMTP/LMTP transaction to a committed ticket.

:meth:`Intake.accept` is the promise behind every ``250``: it returns only
after one transaction holding the raw bytes, the ticket (new or threaded), an
event and the routing work item is durable. Anything it cannot keep raises,
and the listener answers ``4xx``.

Before that, inbound DKIM is verified off the event loop under a deadline; the
verdict is stored beside the raw bytes (which stay exactly as received) and
becomes the ``Authentication-Results`` header of every forwarded copy. With
``authentication.unauthenticated: reject``, a failed verdict is answered
``550 5.7.1`` here, at DATA time, so nobody gets backscatter.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .addresses import extract_address
from .config import Config
from .correlate import Match, find_ticket
from .dkim import Verdict, Verifier
from .ids import TicketIds
from .lifecycle import link, thread_onto
from .rawmessage import HeaderSummary, decoded_text, has_bare_newline, normalize_newlines
from .reply_address import ReplyToken, reply_addresses
from .store import Store, Tx, add_event

log = logging.getLogger("gatewayd.intake")

# Messages above this size are checked and hashed in a worker thread, so one
# 32 MB upload never stalls the other sessions on the event loop.
_INLINE_LIMIT = 256 * 1024


@dataclass(frozen=True)
class Transaction:
    """One SMTP/LMTP transaction as the listener hands it over."""

    listener: str
    peer: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass(frozen=True)
class Accepted:
    ticket: str | None
    number: int | None
    duplicate: bool = False
    threaded_by: str | None = None


class Prepared(NamedTuple):
    data: bytes
    headers: HeaderSummary
    digest: str


class Refused(Exception):
    """Intake refuses the message with this SMTP reply (a policy decision, not a failure)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class Intake:
    """Checks, threads and commits messages; ``on_committed`` wakes the router."""

    def __init__(self, config: Config, store: Store, ids: TicketIds,
                 on_committed: Callable[[], None] = lambda: None, *, verifier: Verifier | None = None) -> None:
        self.config = config
        self.store = store
        self.ids = ids
        self.verifier = verifier or Verifier.from_config(config.dns)
        self._on_committed = on_committed
        self._support = frozenset(a.lower() for a in config.support.addresses)
        self._replies = reply_addresses(config.support.addresses, config.support.reply_secret)

    def recipient_kind(self, address: str) -> str | None:
        """``support``, ``reply`` or ``bounce`` for the addresses gatewayd accepts mail for; None otherwise."""
        lowered = address.lower()
        if lowered in self._support:
            return "support"
        if lowered == self.config.support.bounce_address:
            return "bounce"
        if self._replies.verify(lowered) is not None:
            return "reply"
        return None

    def _reply_token(self, rcpt_tos: tuple[str, ...]) -> ReplyToken | None:
        """The verified reply address among the recipients; an agent's wins over a customer's."""
        tokens = [t for t in map(self._replies.verify, rcpt_tos) if t is not None]
        return next((t for t in tokens if t.role == "agent"), tokens[0] if tokens else None)

    def prepare(self, data: bytes) -> "Prepared":
        """Applies the content limits and summarises the headers; pure and thread-safe."""
        limits = self.config.limits
        if has_bare_newline(data):
            if limits.bare_newlines == "reject":
                raise Refused("550 5.6.0 Message contains a bare CR, bare LF or NUL; send CRLF line endings")
            data = normalize_newlines(data)
        if data[:1] in (b" ", b"\t"):
            # It would fold into the last header gatewayd puts on top of the forward.
            raise Refused("550 5.6.0 Message header begins with a continuation line (RFC 5322 2.2.3)")
        end = data.find(b"\r\n\r\n", 0, limits.max_header_size + 4)
        if (end < 0 and len(data) > limits.max_header_size) or end > limits.max_header_size:
            raise Refused(f"552 5.3.4 Header block exceeds {limits.max_header_size} bytes")
        headers = HeaderSummary.of(data)
        if headers.received_count > limits.max_received_headers or headers.gatewayd_ticket_count >= 2:
            raise Refused("554 5.4.6 Mail loop detected: too many hops through this gateway")
        return Prepared(data, headers, hashlib.sha256(data).hexdigest())

    async def accept(self, transaction: Transaction) -> Accepted:
        if len(transaction.data) > _INLINE_LIMIT:
            prepared = await asyncio.to_thread(self.prepare, transaction.data)
        else:
            prepared = self.prepare(transaction.data)
        for_support = any(self.recipient_kind(r) in ("support", "reply") for r in transaction.rcpt_tos)
        verdict = await self.verifier.check(prepared.data) if for_support else None
        if verdict is not None and verdict.unauthenticated and self.config.authentication.unauthenticated == "reject":
            failed = "DKIM verification" if verdict.failed else "the sender domain's DMARC policy"
            raise Refused(f"550 5.7.1 Message failed {failed}; not accepted")
        now = time.time()

        async def work(tx: Tx) -> Accepted:
            return await self._commit(tx, transaction, prepared, now, verdict)

        accepted = await self.store.transact(work)
        if not accepted.duplicate:
            self._on_committed()
        return accepted

    async def _commit(self, tx: Tx, t: Transaction, prepared: Prepared, now: float,
                      verdict: Verdict | None) -> Accepted:
        data, headers, digest = prepared
        duplicate = await tx.fetchone(
            "SELECT ticket FROM messages WHERE digest = ? AND mail_from = ? AND message_id IS ? "
            "AND direction = 'in' AND received_at >= ? ORDER BY id LIMIT 1",
            (digest, t.mail_from, headers.message_id, now - self.config.limits.duplicate_window))
        if duplicate is not None:
            number = duplicate[0]
            await add_event(tx, number, "duplicate_received",
                            {"message_id": headers.message_id, "listener": t.listener}, at=now)
            return Accepted(self.ids.ref(number) if number else None, number, duplicate=True)

        if verdict is None:
            await self._insert_message(tx, None, t, data, headers, digest, now, None)
            await add_event(tx, None, "bounce_received", {"mail_from": t.mail_from,
                                                          "message_id": headers.message_id}, at=now)
            return Accepted(None, None)

        from_address = extract_address(headers.from_) if headers.from_ else None
        senders = {a.lower() for a in (from_address, t.mail_from) if a}
        token = self._reply_token(t.rcpt_tos)
        if token is not None and token.role == "agent" and await self._ticket_exists(tx, token.ticket):
            return await self._agent_mail(tx, token, t, prepared, now, verdict)
        match = Match(token.ticket, "reply-address") if token is not None else None
        if match is None or not await self._ticket_exists(tx, match.ticket):
            match = await find_ticket(tx, self.ids, headers, senders)
        previous = None
        if match is not None and not await thread_onto(tx, match.ticket, now, self.config.sla.reopen_window,
                                                       actor=from_address or t.mail_from):
            previous, match = match.ticket, None
        if match is None:
            number = await self._create_ticket(tx, headers, from_address or t.mail_from, now)
            rule = None
            role = "customer"
            if previous is not None:
                await link(tx, previous, number, now, self.ids.ref(previous), self.ids.ref(number))
        else:
            number, rule = match.ticket, match.rule
            await tx.execute("UPDATE tickets SET updated_at = ? WHERE number = ?", (now, number))
            role = "correspondent"
        for address in senders:
            await tx.execute("INSERT OR IGNORE INTO participants (ticket, address, role) VALUES (?, ?, ?)",
                             (number, address, role))
        message = await self._insert_message(tx, number, t, data, headers, digest, now, verdict)
        await add_event(tx, number, "message_received" if rule is None else "followup_received", {
            "message": message, "message_id": headers.message_id, "mail_from": t.mail_from,
            "listener": t.listener, "size": len(data), "threaded_by": rule, "dkim": verdict.verdict}, at=now)
        await tx.execute("INSERT INTO work (kind, ticket, message, created_at) VALUES ('route', ?, ?, ?)",
                         (number, message, now))
        autoreply = self.config.autoreply
        if autoreply.enabled and (rule is None or autoreply.followups == "acknowledge"):
            await tx.execute("INSERT INTO work (kind, ticket, message, created_at) VALUES ('receipt', ?, ?, ?)",
                             (number, message, now))
        return Accepted(self.ids.ref(number), number, threaded_by=rule)

    async def _ticket_exists(self, tx: Tx, number: int) -> bool:
        return await tx.fetchone("SELECT 1 FROM tickets WHERE number = ?", (number,)) is not None

    async def _agent_mail(self, tx: Tx, token: ReplyToken, t: Transaction, prepared: Prepared,
                          now: float, verdict: Verdict) -> Accepted:
        """Mail to an agent's reply address: stored on the ticket; the reply worker decides what it is."""
        data, headers, digest = prepared
        message = await self._insert_message(tx, token.ticket, t, data, headers, digest, now, verdict)
        await add_event(tx, token.ticket, "agent_mail_received", {
            "message": message, "message_id": headers.message_id, "mail_from": t.mail_from,
            "listener": t.listener, "size": len(data), "token_agent": token.agent}, at=now)
        await tx.execute("INSERT INTO work (kind, ticket, message, created_at) VALUES ('agent_reply', ?, ?, ?)",
                         (token.ticket, message, now))
        return Accepted(self.ids.ref(token.ticket), token.ticket, threaded_by="reply-address")

    async def _create_ticket(self, tx: Tx, headers: HeaderSummary, customer: str, now: float) -> int:
        row = await tx.fetchone("SELECT max(number) FROM tickets")
        number = max((row[0] or 0) + 1, self.config.tickets.first_number)
        await tx.execute(
            "INSERT INTO tickets (number, subject, customer, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (number, decoded_text(headers.subject), customer.lower(), now, now))
        return number

    async def _insert_message(self, tx: Tx, ticket: int | None, t: Transaction, data: bytes,
                              headers: HeaderSummary, digest: str, now: float, verdict: Verdict | None) -> int:
        auth = None if verdict is None else json.dumps(
            verdict.to_json() | {"header": verdict.header_value(self.config.hostname)})
        return await tx.execute(
            "INSERT INTO messages (ticket, direction, listener, peer, mail_from, rcpt_to, message_id, digest, "
            "size, raw, received_at, auth) VALUES (?, 'in', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ticket, t.listener, t.peer, t.mail_from, json.dumps(list(t.rcpt_tos)), headers.message_id,
             digest, len(data), data, now, auth))
