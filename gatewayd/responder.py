"""The receipt worker: turns committed ``receipt`` work items into receipts in the outbox.

It runs after the ``250`` and after the ticket's routing (work items run in
order), so whatever it decides, the ticket already exists and is forwarded.
Each item ends in one transaction: the rate limits are checked and counted,
and either the signed receipt goes into the outbox or a suppression event
with its reason is written. A receipt that cannot be built is recorded as
``receipt_failed`` and never holds up the work behind it; a store failure
(:class:`~gatewayd.errors.StoreError`) is not the receipt's fault and is
raised, so the item stays queued and is retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone

from .autoreply import Decision, Policy, rate_limited, record
from .business_hours import describe, expected_by
from .config import Config
from .dkim import Signer, Verdict
from .errors import StoreError
from .ids import TicketIds
from .metrics import Metrics
from .rawmessage import HeaderSummary
from .receipt import ReceiptContext, build
from .reply_address import reply_addresses
from .outgoing import enqueue
from .store import MessageRecord, Store, TicketRecord, Tx, WorkItem, add_event, work_done

log = logging.getLogger("gatewayd.responder")

_REPLY_PREFIX = re.compile(r"^(?:(?:re|aw|sv|fwd?|wg)\s*:\s*)+", re.IGNORECASE)


class Responder:
    def __init__(self, config: Config, store: Store, ids: TicketIds, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.ids = ids
        self.metrics = metrics
        self.clock = clock
        self.policy = Policy(config)
        self.signer = Signer.from_config(config.dkim) if config.dkim else None

    async def handle(self, item: WorkItem) -> bool:
        """Decides and commits one receipt; True when one was queued for sending."""
        try:
            return await self._respond(item)
        except StoreError:
            # The store failing is not the receipt's fault: the item stays queued and is retried.
            raise
        except Exception as exc:
            log.exception("receipt for ticket %s failed; the ticket itself is unaffected", item.ticket)
            detail = {"message": item.message, "error": f"{type(exc).__name__}: {exc}"[:300]}

            async def failed(tx: Tx) -> None:
                await add_event(tx, item.ticket, "receipt_failed", detail)
                await work_done(tx, item.id)
            await self.store.transact(failed)
            return False

    async def _respond(self, item: WorkItem) -> bool:
        ticket = await self.store.ticket(item.ticket)
        message = await self.store.message(item.message) if item.message is not None else None
        if ticket is None or message is None:
            await self.store.transact(lambda tx: work_done(tx, item.id))
            return False
        if not self.config.autoreply.enabled or self.config.autoreply.templates is None:
            await self.store.transact(lambda tx: self._suppress(tx, item, "receipt", "disabled"))
            self.metrics.autoreply("suppressed", "disabled")
            return False
        raw = await self.store.message_raw(message.id)
        row = await self.store.fetchone("SELECT auth FROM messages WHERE id = ?", (message.id,))
        verdict = Verdict.from_json(json.loads(row[0]) if row and row[0] else None)
        followup = await self.store.first_message(ticket.number) != message.id
        kind = "followup" if followup else "receipt"
        decision = await asyncio.to_thread(self.policy.decide, message.mail_from, raw, verdict)
        if not decision.send:
            await self.store.transact(lambda tx: self._suppress(tx, item, kind, decision.reason))
            self.metrics.autoreply("suppressed", decision.reason)
            log.info("receipt suppressed ticket=%s reason=%s", self.ids.ref(ticket.number), decision.reason)
            return False
        assert decision.rcpt is not None
        message_id = self.ids.message_id(ticket.number)
        data = await asyncio.to_thread(self._compose, kind, ticket, message, raw, decision, message_id)
        now = self.clock()

        async def commit(tx: Tx) -> str | None:
            limited = await rate_limited(tx, self.config.autoreply.rate, ticket.number, kind, decision.rcpt or "",
                                         now)
            if limited:
                await self._suppress(tx, item, kind, limited)
                return limited
            await record(tx, ticket.number, kind, decision.rcpt or "", now)
            await enqueue(tx, kind="receipt", ticket=ticket.number, rcpt=decision.rcpt, mail_from="",
                          message_id=message_id, content=data, now=now)
            await add_event(tx, ticket.number, "receipt_queued", {
                "message": message.id, "kind": kind, "rcpt": decision.rcpt, "message_id": message_id,
                "signed": self.signer is not None}, at=now)
            await work_done(tx, item.id, now)
            return None

        limited = await self.store.transact(commit)
        if limited:
            self.metrics.autoreply("suppressed", limited)
            log.info("receipt suppressed ticket=%s reason=%s", self.ids.ref(ticket.number), limited)
            return False
        self.metrics.autoreply("sent", "none")
        log.info("receipt queued ticket=%s kind=%s rcpt=<%s>", self.ids.ref(ticket.number), kind, decision.rcpt)
        return True

    async def _suppress(self, tx: Tx, item: WorkItem, kind: str, reason: str) -> None:
        await add_event(tx, item.ticket, "autoreply_suppressed", {"message": item.message, "kind": kind,
                                                                  "reason": reason})
        await work_done(tx, item.id)

    def _compose(self, kind: str, ticket: TicketRecord, message: MessageRecord, raw: bytes, decision: Decision,
                 message_id: str) -> bytes:
        """Builds and signs the receipt; blocking."""
        assert self.config.autoreply.templates is not None and decision.rcpt is not None
        support = self._support_address(message)
        received = datetime.fromtimestamp(ticket.created_at, timezone.utc)
        due = expected_by(received, self.config.sla.first_response, self.config.business_hours)
        ctx = ReceiptContext(
            ticket=self.ids.ref(ticket.number), support_address=support, customer_address=decision.rcpt,
            customer_name=decision.name, subject=_REPLY_PREFIX.sub("", ticket.subject).strip(), team=ticket.team,
            expected=describe(due, datetime.fromtimestamp(self.clock(), timezone.utc)),
            message_id=message_id, pseudo_reference=self.ids.pseudo_reference(ticket.number),
            customer_message_id=HeaderSummary.of(raw).message_id,
            date=datetime.fromtimestamp(self.clock(), timezone.utc),
            reply_to=reply_addresses(self.config.support.addresses,
                                     self.config.support.reply_secret).for_customer(ticket.number))
        data = build(self.config.autoreply.templates.get(kind, ticket.team), ctx)
        return self.signer.sign(data) if self.signer is not None else data

    def _support_address(self, message: MessageRecord) -> str:
        """The support address the customer wrote to (the first one on the envelope)."""
        support = set(self.config.support.addresses)
        return next((r.lower() for r in message.rcpt_to if r.lower() in support), self.config.support.addresses[0])

