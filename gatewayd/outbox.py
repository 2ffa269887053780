"""The outbox worker: every outgoing message leaves through here, at least once.

Items are rows in the store; the worker sends what is due through the relay,
``relay.concurrency`` at a time, and records each attempt in the same store.
``4xx`` and network errors back off exponentially until ``retry.give_up``;
``5xx`` fails the item at once. Failed items stay visible (``gatewayd queue
list``) with the relay's reply, and every outcome is an event on the ticket.
After a crash, anything not recorded as sent is sent again with the same
Message-ID, so a duplicate at the agent's mailbox is recognisable.

Messages go over the relay sessions :class:`~gatewayd.relay.Relay` keeps open.
Results are recorded by one recorder, many per transaction: while other
deliveries are in flight a result waits up to :data:`_RECORD_WINDOW` for
company, so a burst costs a few commits instead of one per message. A result
the store cannot take (store full) stays in ``_unrecorded``: the item is held
back one retry interval and then only recorded, never sent again. An attempt
is recorded with the time it ended (a sent item's ``updated_at`` and its
``delivered`` event say when the relay took it), not the time of the commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .agent_mail import notice
from .compose import assemble
from .config import Config
from .dkim import Signer
from .ids import TicketIds
from .metrics import Metrics
from .outgoing import enqueue
from .relay import Relay, SendResult
from .reoffer import reoffer
from .store import OutboxItem, Part, Store, Tx, Writes, add_event, event_statement
from .webhook import Webhooks

log = logging.getLogger("gatewayd.outbox")

_IDLE_POLL = 5.0
# Forwards above this size are assembled in a worker thread: copying a 32 MB
# message must not pause the SMTP sessions sharing the loop.
_INLINE_ASSEMBLY = 256 * 1024
# A delivery result waits this long for others to share its commit, but only while
# more deliveries are in flight: alone, it is recorded at once.
_RECORD_WINDOW = 0.01
_RECORD_BATCH = 128


@dataclass(frozen=True)
class _Attempt:
    """A delivery attempt's result and when it ended, kept until it is recorded."""

    result: SendResult
    ended: float


class Outbox:
    def __init__(self, config: Config, store: Store, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._wake = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(config.relay.concurrency)
        self._stopping = False
        self._held: dict[int, float] = {}
        # Items whose delivery ended while a scan of due items was running: that scan
        # may have read them as still pending, and must not start them again.
        self._settled: set[int] = set()
        self._unrecorded: dict[int, _Attempt] = {}
        # Items whose attempt is over and whose result waits for the recorder: they no longer
        # take a delivery slot, so a slow commit does not hold up the next sends.
        self._recording: set[int] = set()
        self._results: list[tuple[OutboxItem, _Attempt, asyncio.Future[None]]] = []
        self._recorder: asyncio.Task[None] | None = None
        self._relay = Relay(config.relay, config.hostname)
        self._webhooks = Webhooks(config.relay.concurrency, config.relay.timeout)
        self._ids = TicketIds(config.tickets.prefix, config.hostname, config.support.reply_secret.encode())
        self._signer = Signer.from_config(config.dkim) if config.dkim else None

    def wake(self) -> None:
        """Something new is due: look now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self._launch_due()
                delay = await self._until_next_due()
            except Exception:
                log.exception("outbox scan failed; retrying in %.0fs", _IDLE_POLL)
                delay = _IDLE_POLL
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def stop(self, grace: float) -> None:
        """Stops launching deliveries and lets those in flight finish within ``grace`` seconds."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values())
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._recorder is not None:
            await asyncio.wait({self._recorder})
        await self._relay.close()
        self._webhooks.close()

    @property
    def _free(self) -> int:
        """Deliveries that may start now: a few per relay session, so the next is ready when one ends."""
        return self.config.relay.concurrency * 4 - (len(self._inflight) - len(self._recording))

    async def _launch_due(self) -> None:
        free = self._free
        if free <= 0:
            return
        now = self.clock()
        self._held = {item: until for item, until in self._held.items() if until > now}
        self._settled.clear()
        for item in await self.store.due_outbox(now, free + len(self._inflight) + len(self._held)):
            if item.id in self._inflight or item.id in self._held or item.id in self._settled or self._stopping:
                continue
            task = asyncio.get_running_loop().create_task(self._deliver(item), name=f"deliver-{item.id}")
            self._inflight[item.id] = task

    async def _until_next_due(self) -> float:
        if self._free <= 0:
            # The next delivery to end wakes the loop; waiting for the next due item would spin.
            return _IDLE_POLL
        due = await self.store.next_outbox_due(excluding=(*self._inflight, *self._held))
        if self._held:
            due = min(filter(None, (due, min(self._held.values()))))
        if due is None:
            return _IDLE_POLL
        return min(_IDLE_POLL, max(0.0, due - self.clock()))

    async def _deliver(self, item: OutboxItem) -> None:
        try:
            async with self._slots:
                if self._stopping:
                    return
                attempt = self._unrecorded.get(item.id)
                if attempt is None:
                    result = await self._attempt(item)
                    attempt = _Attempt(result, self.clock())
                    self.metrics.delivery_attempt(item.kind, result.outcome)
                    self._unrecorded[item.id] = attempt
            self._recording.add(item.id)
            self._wake.set()
            await self._recorded(item, attempt)
            del self._unrecorded[item.id]
            log.info("delivery item=%d kind=%s ticket=%s rcpt=<%s> attempt=%d outcome=%s reply=%r", item.id,
                     item.kind, item.ticket, item.rcpt, item.attempts + 1, attempt.result.outcome, attempt.result.reply)
        except Exception:
            # Held back for one retry interval: an attempt that cannot be recorded
            # (store full) is not repeated in a tight loop, and one the relay took is
            # only recorded later, never sent again.
            self._held[item.id] = self.clock() + self.config.relay.retry.first
            log.exception("delivery of outbox item %d failed unexpectedly; it stays pending and is retried in %gs",
                          item.id, self.config.relay.retry.first)
        finally:
            self._inflight.pop(item.id, None)
            self._recording.discard(item.id)
            self._settled.add(item.id)
            self._wake.set()

    async def _recorded(self, item: OutboxItem, attempt: _Attempt) -> None:
        """Returns once the result is committed (raising if it could not be); the recorder batches them."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._results.append((item, attempt, future))
        if self._recorder is None or self._recorder.done():
            self._recorder = loop.create_task(self._record_results(), name="outbox-recorder")
        await future

    async def _record_results(self) -> None:
        while self._results:
            if not self._stopping and len(self._inflight) > len(self._recording):
                await asyncio.sleep(_RECORD_WINDOW)
            batch, self._results = self._results[:_RECORD_BATCH], self._results[_RECORD_BATCH:]
            parts = [self._record(item, attempt.result, attempt.ended) for item, attempt, _ in batch]
            try:
                outcomes = await self.store.transact_each(parts)
            except Exception as exc:
                outcomes = [exc] * len(batch)
            for (_, _, future), outcome in zip(batch, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(None)

    async def _attempt(self, item: OutboxItem) -> SendResult:
        head, raw = await self.store.outbox_parts(item.id, item.message)
        if raw is None:
            content = head
        elif len(raw) > _INLINE_ASSEMBLY:
            content = await asyncio.to_thread(assemble, head, raw)
        else:
            content = assemble(head, raw)
        if item.kind == "alert" and self._signer is not None:
            # Alerts are built inside store transactions, where signing
            # would block the loop; receipts and replies are signed when built.
            content = await asyncio.to_thread(self._signer.sign, content)
        if item.kind == "webhook":
            return await self._webhooks.post(item.rcpt, content)
        return await self._relay.send(item.mail_from, item.rcpt, content)

    def _record(self, item: OutboxItem, result: SendResult, now: float) -> Part:
        """The write that records one attempt that ended at ``now``: the item's new state and its event,
        and on a permanent failure what follows from it (that part reads the store, so it is a job)."""
        attempts = item.attempts + 1
        retry = self.config.relay.retry
        detail = {"item": item.id, "kind": item.kind, "rcpt": item.rcpt, "attempt": attempts, "reply": result.reply}
        if result.outcome == "sent":
            state, kind, next_at = "sent", "delivered", now
        elif result.outcome == "retry" and now - item.created_at < retry.give_up:
            state, kind, next_at = "pending", "delivery_deferred", now + retry.delay(attempts)
            detail["next_attempt_at"] = next_at
        else:
            state, kind, next_at = "failed", "delivery_failed", now
            if result.outcome == "retry":
                detail["gave_up_after"] = now - item.created_at
        statements = (
            ("UPDATE outbox SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?, updated_at = ? "
             "WHERE id = ?", (state, attempts, next_at, None if state == "sent" else result.reply, now, item.id)),
            event_statement(item.ticket, kind, detail, at=now))
        if state != "failed":
            return Writes(statements)

        async def failed(tx: Tx) -> None:
            for statement in statements:
                await tx.execute(*statement)
            await self._after_permanent_failure(tx, item, result, now)
        return failed

    async def _after_permanent_failure(self, tx: Tx, item: OutboxItem, result: SendResult, now: float) -> None:
        """Never silently dropped: a forward goes to another agent (or the supervisor hears of it),
        an agent's undeliverable reply is reported back to that agent. Receipts, alerts and
        webhooks end with the event above: alerting about an alert would loop."""
        if item.ticket is None or item.kind not in ("forward", "reply"):
            return
        if item.kind == "forward" and item.agent and await reoffer(tx, item.ticket, item.agent, "delivery_failed", now):
            return
        ticket = self._ids.ref(item.ticket)
        if item.kind == "reply" and item.agent and (agent := self.config.agent(item.agent)) is not None:
            rcpt, subject = agent.address, f"[{ticket}] Your reply could not be delivered"
            text = (f"Your reply on {ticket} to <{item.rcpt}> was refused permanently.\n"
                    f"The relay answered: {result.reply}\n")
        else:
            row = await tx.fetchone("SELECT team FROM tickets WHERE number = ?", (item.ticket,))
            team = self.config.team(row[0] if row and row[0] else self.config.fallback.team)
            if team is None:
                return
            rcpt, subject = team.supervisor, f"[{ticket}] Undeliverable forward needs an owner"
            text = (f"The forward of {ticket} to <{item.rcpt}> failed permanently and no other agent "
                    f"could take it.\nThe relay answered: {result.reply}\n")
        message_id = self._ids.message_id(item.ticket)
        content = notice(sender=self.config.support.addresses[0], rcpt=rcpt, subject=subject, text=text,
                         message_id=message_id, ticket=ticket)
        await enqueue(tx, kind="alert", ticket=item.ticket, rcpt=rcpt, mail_from=self.config.support.bounce_address,
                      message_id=message_id, content=content, now=now)
        await add_event(tx, item.ticket, "failure_reported", {"item": item.id, "to": rcpt}, actor="gatewayd", at=now)
