"""The receipt worker: turns committed ``receipt`` work items into receipts in the outbox.

It runs after the ``250`` and after the ticket's routing (work items run in
order, in the router's batches), so whatever it decides, the ticket already
exists and is forwarded. Each item ends in one write, committed with its
batch: the rate limits are checked and counted, and either the signed receipt
goes into the outbox or a suppression event with its reason is written. A
receipt that cannot be built is recorded as ``receipt_failed`` and never holds
up the work behind it; a store failure (:class:`~gatewayd.errors.StoreError`)
is not the receipt's fault and is raised, so the item stays queued and is
retried.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone

from .autoreply import Decision, Policy, rate_limited, record
from .batch import BatchView, Planned, commit_alone
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
from .store import (MessageRecord, Statement, Store, TicketRecord, Tx, WorkItem, Writes, add_event, event_statement,
                    work_done, work_done_statement)

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
        """Decides and commits one receipt on its own; True when one was queued for sending."""
        try:
            return await self._respond(item)
        except StoreError:
            # The store failing is not the receipt's fault: the item stays queued and is retried.
            raise
        except Exception as exc:
            await commit_alone(self.store, self._failed(item, exc))
            return False

    async def plan(self, item: WorkItem, view: BatchView) -> Planned:
        """Decides one receipt of a router batch; only a :class:`StoreError` is raised."""
        try:
            return await self._plan(item, view)
        except StoreError:
            raise
        except Exception as exc:
            return self._failed(item, exc)

    async def _respond(self, item: WorkItem) -> bool:
        planned = await self._plan(item, BatchView(self.store))
        return planned.after(await commit_alone(self.store, planned))

    def _failed(self, item: WorkItem, exc: Exception) -> Planned:
        log.error("receipt for ticket %s failed; the ticket itself is unaffected", item.ticket, exc_info=exc)
        detail = {"message": item.message, "error": f"{type(exc).__name__}: {exc}"[:300]}
        return Planned(Writes((event_statement(item.ticket, "receipt_failed", detail), work_done_statement(item.id))))

    def _suppressed(self, item: WorkItem, kind: str, reason: str, ticket: int) -> Planned:
        def after(_: None) -> bool:
            self.metrics.autoreply("suppressed", reason)
            if reason != "disabled":
                log.info("receipt suppressed ticket=%s reason=%s", self.ids.ref(ticket), reason)
            return False
        return Planned(Writes(_suppression(item, kind, reason)), after)

    async def _plan(self, item: WorkItem, view: BatchView) -> Planned:
        ticket = await view.ticket(item.ticket)
        inbound = await view.inbound(item.message) if item.message is not None else None
        if ticket is None or inbound is None:
            return Planned(Writes((work_done_statement(item.id),)))
        if not self.config.autoreply.enabled or self.config.autoreply.templates is None:
            return self._suppressed(item, "receipt", "disabled", ticket.number)
        message, raw = inbound.record, inbound.raw
        verdict = Verdict.from_json(inbound.auth)
        followup = await view.first_message(ticket.number) != message.id
        kind = "followup" if followup else "receipt"
        message_id = self.ids.message_id(ticket.number)
        decision, data = await asyncio.to_thread(self._decide_and_compose, kind, ticket, message, raw, verdict,
                                                 message_id)
        if data is None or decision.rcpt is None:
            return self._suppressed(item, kind, decision.reason, ticket.number)
        rcpt, receipt = decision.rcpt, data
        now = self.clock()
        rate = self.config.autoreply.rate

        async def commit(tx: Tx) -> str | None:
            limited = await rate_limited(tx, rate, ticket.number, kind, rcpt, now)
            if limited:
                for statement in _suppression(item, kind, limited):
                    await tx.execute(*statement)
                return limited
            await record(tx, ticket.number, kind, rcpt, now)
            await enqueue(tx, kind="receipt", ticket=ticket.number, rcpt=rcpt, mail_from="",
                          message_id=message_id, content=receipt, now=now)
            await add_event(tx, ticket.number, "receipt_queued", {
                "message": message.id, "kind": kind, "rcpt": rcpt, "message_id": message_id,
                "signed": self.signer is not None}, at=now)
            await work_done(tx, item.id, now)
            return None

        def after(limited: str | None) -> bool:
            if limited:
                self.metrics.autoreply("suppressed", limited)
                log.info("receipt suppressed ticket=%s reason=%s", self.ids.ref(ticket.number), limited)
                return False
            self.metrics.autoreply("sent", "none")
            log.info("receipt queued ticket=%s kind=%s rcpt=<%s>", self.ids.ref(ticket.number), kind, rcpt)
            return True
        return Planned(commit, after)

    def _decide_and_compose(self, kind: str, ticket: TicketRecord, message: MessageRecord, raw: bytes,
                            verdict: Verdict, message_id: str) -> tuple[Decision, bytes | None]:
        """The policy's decision and, if it allows one, the signed receipt (None otherwise); blocking."""
        decision = self.policy.decide(message.mail_from, raw, verdict)
        if not decision.send:
            return decision, None
        return decision, self._compose(kind, ticket, message, raw, decision, message_id)

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


def _suppression(item: WorkItem, kind: str, reason: str) -> tuple[Statement, ...]:
    return (event_statement(item.ticket, "autoreply_suppressed", {"message": item.message, "kind": kind,
                                                                  "reason": reason}),
            work_done_statement(item.id))
