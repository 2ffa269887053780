"""The agent reply path: mail to an agent's reply address becomes commands and a reply to the customer.

Runs on the router's worker for ``agent_reply`` work rows written by intake,
after the ``250``. Only the agent the address was minted for, who still owns
the ticket, is relayed (envelope sender and ``From`` are both their configured
address, and the message's DKIM verdict did not fail). An out-of-office answer
from that agent is never relayed: the agent is marked away and their unacknowledged tickets are re-offered. Anything else
is recorded, counted and reported to the team's supervisor, never relayed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace

from . import agent_commands, agent_mail
from .compose import forward_head
from .config import AgentConfig, Config
from .dkim import Verdict
from .ids import TicketIds, message_ids
from .metrics import Metrics
from .outgoing import enqueue
from .reoffer import reoffer
from .reply_address import ReplyAddresses, ReplyToken, reply_addresses
from .sla import ClockState, clock_state
from .store import (
    EventRecord,
    MessageRecord,
    Store,
    TicketRecord,
    Tx,
    WorkItem,
    add_event,
    work_done,
)

log = logging.getLogger("gatewayd.agent_reply")

Signer = Callable[[bytes], bytes]
_REASONS = {"auto_reply": "an automatic reply", "not_owner": "the agent no longer owns the ticket",
            "not_agent": "the sender is not the agent the address was given to",
            "dkim_failed": "the message's DKIM signature did not verify",
            "unreadable": "the message could not be read safely"}


class _Unbuildable(Exception):
    """The customer-facing reply could not be built from the agent's message."""


class AgentReplies:
    """``handle`` is registered as the router's ``agent_reply`` work handler."""

    def __init__(self, config: Callable[[], Config], store: Store, ids: TicketIds, metrics: Metrics,
                 on_enqueued: Callable[[], None] = lambda: None, on_reoffer: Callable[[], None] = lambda: None,
                 sign: Signer | None = None, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self.store = store
        self.ids = ids
        self.metrics = metrics
        self._on_enqueued = on_enqueued
        self._on_reoffer = on_reoffer
        self._sign = sign
        self.clock = clock

    async def handle(self, item: WorkItem) -> None:
        config = self._config()
        replies = reply_addresses(config.support.addresses, config.support.reply_secret)
        ticket = await self.store.ticket(item.ticket)
        record = await self.store.message(item.message) if item.message is not None else None
        token = next((t for t in map(replies.verify, record.rcpt_to) if t and t.role == "agent"), None) \
            if record else None
        if ticket is None or record is None or token is None:
            log.error("agent_reply work %d names a missing ticket, message or token; marking it done", item.id)
            await self.store.transact(lambda tx: work_done(tx, item.id, self.clock()))
            return
        mail = await asyncio.to_thread(agent_mail.read, await self.store.message_raw(record.id),
                                       max_depth=config.limits.mime_depth)
        agent = next((a for a in config.agents if a.name.lower() == token.agent), None)
        # Both the envelope sender and the (single, clean) From must be the agent's address.
        address = agent.address.lower() if agent is not None else None
        from_agent = (address is not None and record.mail_from.lower() == address
                      and mail.from_address == address)
        if from_agent and (await self._verdict(record.id)).unauthenticated:
            await self._refuse(config, ticket, record, token, item, "dkim_failed")
        elif mail.auto_reply and from_agent:
            assert agent is not None
            await self._away(config, agent, ticket, item)
        elif mail.auto_reply or not from_agent or ticket.agent != (agent.name if agent else None):
            await self._refuse(config, ticket, record, token, item, "auto_reply" if mail.auto_reply else
                               "not_owner" if from_agent else "not_agent")
        elif mail.unreadable:
            await self._refuse(config, ticket, record, token, item, "unreadable")
        else:
            assert agent is not None
            await self._from_agent(config, agent, ticket, record, token, mail, item)

    async def _verdict(self, message: int) -> Verdict:
        """The DKIM verdict intake stored for ``message`` (none recorded: not failed)."""
        row = await self.store.fetchone("SELECT auth FROM messages WHERE id = ?", (message,))
        try:
            return Verdict.from_json(json.loads(row[0]) if row and row[0] else None)
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("message %d has an unreadable stored DKIM verdict; treating it as failed", message)
            return Verdict(verdict="permerror", detail="stored verdict unreadable")

    async def handover(self, item: WorkItem) -> None:
        """``handover`` work (``#assign <agent>``): the new owner gets the forward with their own reply address."""
        config = self._config()
        ticket = await self.store.ticket(item.ticket)
        agent = config.agent(ticket.agent) if ticket is not None and ticket.agent else None
        now = self.clock()
        if ticket is None or agent is None or item.message is None:
            await self.store.transact(lambda tx: work_done(tx, item.id, now))
            return
        replies = reply_addresses(config.support.addresses, config.support.reply_secret)
        raw = await self.store.message_raw(item.message)
        message_id = self.ids.message_id(ticket.number)
        head = await asyncio.to_thread(forward_head, self.ids, ticket.number, raw, agent=agent.name,
                                       message_id=message_id, route_summary="assigned by #assign",
                                       reply_to=replies.for_agent(ticket.number, agent.name))

        async def write(tx: Tx) -> None:
            await enqueue(tx, kind="forward", ticket=ticket.number, message=item.message, agent=agent.name,
                          mail_from=config.support.bounce_address, rcpt=agent.address, message_id=message_id,
                          content=head, now=now)
            await tx.execute("INSERT OR IGNORE INTO participants (ticket, address, role) VALUES (?, ?, 'agent')",
                             (ticket.number, agent.address))
            await work_done(tx, item.id, now)
        await self.store.transact(write)
        self._on_enqueued()

    async def _away(self, config: Config, agent: AgentConfig, ticket: TicketRecord, item: WorkItem) -> None:
        """Out of office: away, and every open ticket of theirs not yet acknowledged goes to someone else."""
        now = self.clock()
        await self.store.set_agent_away(agent.name, True, "out-of-office auto-reply")
        pending = []
        for open_ticket in await self.store.tickets(open_only=True, limit=100000):
            if open_ticket.agent == agent.name:
                state = clock_state(open_ticket, await self.store.events(open_ticket.number))
                if state.acked_at is None:
                    pending.append(open_ticket.number)

        async def write(tx: Tx) -> int:
            await add_event(tx, ticket.number, "agent_auto_reply", {"agent": agent.name}, actor=agent.name, at=now)
            count = 0
            for number in pending:
                count += await reoffer(tx, number, agent.name, "out_of_office", now)
            await work_done(tx, item.id, now)
            return count
        count = await self.store.transact(write)
        log.info("out-of-office from agent=%s: marked away, %d tickets re-offered", agent.name, count)
        if count:
            self._on_reoffer()

    async def _refuse(self, config: Config, ticket: TicketRecord, record: MessageRecord, token: ReplyToken,
                      item: WorkItem, reason: str) -> None:
        now = self.clock()
        ref = self.ids.ref(ticket.number)
        team = config.team(ticket.team or config.fallback.team) or config.teams[0]
        alert = None
        if reason != "auto_reply":
            alert = await asyncio.to_thread(
                agent_mail.notice, sender=config.support.addresses[0], rcpt=team.supervisor,
                message_id=self.ids.message_id(ticket.number), ticket=ref,
                subject=f"{self.ids.tag(ticket.number)} reply refused: {_REASONS[reason]}",
                text=(f"Mail to the reply address of agent {token.agent} on {ref} was not relayed to the "
                      f"customer: {_REASONS[reason]}.\n\nEnvelope sender: <{record.mail_from}>\nMessage: #{record.id} "
                      f"(gatewayd tickets show {ref})\n"))

        async def write(tx: Tx) -> None:
            await add_event(tx, ticket.number, "reply_refused", {
                "message": record.id, "mail_from": record.mail_from, "token_agent": token.agent,
                "reason": reason}, actor=record.mail_from or "<>", at=now)
            if alert is not None:
                await enqueue(tx, kind="alert", ticket=ticket.number, rcpt=team.supervisor,
                              mail_from=config.support.bounce_address, message_id=_header_id(alert),
                              content=alert, now=now)
            await work_done(tx, item.id, now)
        await self.store.transact(write)
        self.metrics.reply_refused(reason)
        log.warning("agent reply refused ticket=%s from=<%s> reason=%s", ref, record.mail_from, reason)
        if alert is not None:
            self._on_enqueued()

    async def _from_agent(self, config: Config, agent: AgentConfig, ticket: TicketRecord, record: MessageRecord,
                          token: ReplyToken, mail: agent_mail.AgentMail, item: WorkItem) -> None:
        parsed = agent_commands.parse(mail.text)
        relay = parsed.has_text or bool(mail.attachments)
        content = message_id = None
        if relay:
            try:
                content, message_id = await self._compose(config, agent, ticket, mail, parsed.text)
            except _Unbuildable:
                log.exception("reply for ticket=%s could not be built", self.ids.ref(ticket.number))
                await self._refuse(config, ticket, record, token, item, "unreadable")
                return
        now = self.clock()
        team = ticket.team or config.fallback.team
        observed: list[tuple[str, float]] = []
        reoffered = False

        async def write(tx: Tx) -> None:
            nonlocal reoffered
            state = clock_state(ticket, await _events(tx, ticket.number))
            acked = state.acked_at is not None
            for command in parsed.commands:
                if command.name == "ack" and not acked:
                    acked = await self._ack(tx, ticket, state, agent.name, now, "command", observed)
                else:
                    reoffered |= await self._apply(tx, config, ticket, agent.name, command, now)
            if parsed.problems:
                await add_event(tx, ticket.number, "command_refused", {"problems": list(parsed.problems)},
                                actor=agent.name, at=now)
            if content is not None and message_id is not None:
                if not acked:
                    await self._ack(tx, ticket, state, agent.name, now, "reply", observed)
                await enqueue(tx, kind="reply", ticket=ticket.number, rcpt=ticket.customer,
                              mail_from=config.support.bounce_address, message_id=message_id, content=content,
                              now=now, agent=agent.name)
                await add_event(tx, ticket.number, "replied", {"message": record.id, "message_id": message_id,
                                                               "rcpt": ticket.customer}, actor=agent.name, at=now)
                if state.replied_at is None:
                    observed.append(("first_response", now - state.response_start))
            await work_done(tx, item.id, now)
        await self.store.transact(write)
        for what, seconds in observed:
            (self.metrics.acknowledged if what == "ack" else self.metrics.first_response)(team, seconds)
        log.info("agent mail ticket=%s agent=%s commands=%s relayed=%s", self.ids.ref(ticket.number), agent.name,
                 ",".join(c.name for c in parsed.commands) or "-", content is not None)
        if content is not None:
            self._on_enqueued()
        if reoffered:
            self._on_reoffer()

    async def _ack(self, tx: Tx, ticket: TicketRecord, state: ClockState, agent: str, now: float, via: str,
                   observed: list[tuple[str, float]]) -> bool:
        await add_event(tx, ticket.number, "acked", {"via": via}, actor=agent, at=now)
        started = state.routed_at if state.routed_at is not None else ticket.created_at
        observed.append(("ack", now - started))
        return True

    async def _apply(self, tx: Tx, config: Config, ticket: TicketRecord, actor: str,
                     command: agent_commands.Command, now: float) -> bool:
        """One command's change and its event; True when it queued a routing run."""
        number = ticket.number
        if command.name == "close":
            await tx.execute("UPDATE tickets SET status = 'closed', updated_at = ? WHERE number = ?", (now, number))
            await add_event(tx, number, "closed", {}, actor=actor, at=now)
        elif command.name == "reopen":
            await tx.execute("UPDATE tickets SET status = 'open', updated_at = ? WHERE number = ?", (now, number))
            await add_event(tx, number, "reopened", {"by": "agent"}, actor=actor, at=now)
        elif command.name == "note":
            await add_event(tx, number, "note", {"text": command.argument}, actor=actor, at=now)
        elif command.name == "priority":
            await tx.execute("UPDATE tickets SET priority = ?, updated_at = ? WHERE number = ?",
                             (command.argument, now, number))
            await add_event(tx, number, "priority_changed", {"priority": command.argument}, actor=actor, at=now)
        elif command.name == "assign":
            return await self._assign(tx, config, ticket, actor, command.argument, now)
        return False

    async def _assign(self, tx: Tx, config: Config, ticket: TicketRecord, actor: str, target: str,
                      now: float) -> bool:
        """``#assign bob`` hands over directly; ``#assign security`` lets that team's routing pick."""
        agent = next((a for a in config.agents if a.name.lower() == target), None)
        team = next((t for t in config.teams if t.name.lower() == target), None)
        if agent is None and team is None:
            await add_event(tx, ticket.number, "command_refused",
                            {"problems": [f"#assign {target}: no such agent or team"]}, actor=actor, at=now)
            return False
        if agent is not None:
            new_team = ticket.team if ticket.team in agent.teams else (agent.teams[0] if agent.teams else ticket.team)
            await tx.execute("UPDATE tickets SET agent = ?, team = ?, updated_at = ? WHERE number = ?",
                             (agent.name, new_team, now, ticket.number))
            await add_event(tx, ticket.number, "reassigned", {"agent": agent.name, "from": ticket.agent,
                                                               "team": new_team}, actor=actor, at=now)
            first = await tx.fetchone("SELECT min(id) FROM messages WHERE ticket = ?", (ticket.number,))
            await tx.execute("INSERT INTO work (kind, ticket, message, created_at) VALUES ('handover', ?, ?, ?)",
                             (ticket.number, first[0] if first else None, now))
            return True
        assert team is not None
        # The team's routing picks afresh: no owner (so a follow-up is not kept with the old one) and no
        # lapse recorded for the agent who handed the ticket over.
        message = await _latest_customer_message(tx, ticket.number, config)
        await tx.execute("UPDATE tickets SET team = ?, agent = NULL, updated_at = ? WHERE number = ?",
                         (team.name, now, ticket.number))
        await add_event(tx, ticket.number, "assigned", {"team": team.name, "from": ticket.agent},
                        actor=actor, at=now)
        if message is None:
            log.warning("#assign %s on ticket %d: no inbound customer message to route", team.name, ticket.number)
            return False
        await tx.execute("INSERT INTO work (kind, ticket, message, created_at) VALUES ('route', ?, ?, ?)",
                         (ticket.number, message, now))
        return True

    async def _compose(self, config: Config, agent: AgentConfig, ticket: TicketRecord, mail: agent_mail.AgentMail,
                       text: str) -> tuple[bytes, str]:
        replies = reply_addresses(config.support.addresses, config.support.reply_secret)
        support = await self._support_address(ticket.number, config)
        local, domain = replies.base
        tokens = re.compile(rf"{re.escape(local)}\+[^@\s<>\"]+@{re.escape(domain)}", re.IGNORECASE)
        inbound = [m for m in await self.store.messages(ticket.number)
                   if m.direction == "in" and m.message_id and not _to_reply_address(m, replies)]
        refs = [m.message_id for m in inbound if m.message_id][-10:]
        subject = _subject(self.ids, ticket, mail.subject)
        message_id = self.ids.message_id(ticket.number)
        reply = agent_mail.Reply(
            support_address=support, display_name=config.support.reply_name.replace("{agent}", agent.name.title()),
            customer=ticket.customer, subject=subject, text="", message_id=message_id,
            in_reply_to=refs[-1] if refs else None,
            references=tuple(r for r in refs if message_ids(r)) + (self.ids.pseudo_reference(ticket.number),),
            reply_to=replies.for_customer(ticket.number), ticket=self.ids.ref(ticket.number),
            attachments=mail.attachments)
        reply = replace(reply, text=agent_mail.scrub(text, hidden=(agent.address,), support_address=support,
                                                     token_pattern=tokens))
        try:
            content = await asyncio.to_thread(agent_mail.build, reply)
        except Exception as exc:
            raise _Unbuildable(f"{type(exc).__name__}: {exc}") from exc
        if self._sign is not None:
            content = await asyncio.to_thread(self._sign, content)
        return content, message_id

    async def _support_address(self, ticket: int, config: Config) -> str:
        """The support address the customer wrote to, so the conversation stays on it."""
        first = await self.store.first_message(ticket)
        record = await self.store.message(first) if first is not None else None
        support = set(config.support.addresses)
        if record is not None:
            for rcpt in record.rcpt_to:
                if rcpt.lower() in support:
                    return rcpt.lower()
        return config.support.addresses[0]


def _to_reply_address(record: MessageRecord, replies: ReplyAddresses) -> bool:
    return _agent_rcpt(record.rcpt_to, replies)


def _agent_rcpt(rcpt_to: list[str] | tuple[str, ...], replies: ReplyAddresses) -> bool:
    return any((t := replies.verify(r)) is not None and t.role == "agent" for r in rcpt_to)


async def _latest_customer_message(tx: Tx, ticket: int, config: Config) -> int | None:
    """The newest inbound message of the ticket that is not agent mail to a reply address."""
    replies = reply_addresses(config.support.addresses, config.support.reply_secret)
    rows = await tx.fetchall("SELECT id, rcpt_to FROM messages WHERE ticket = ? AND direction = 'in' ORDER BY id DESC",
                             (ticket,))
    for message, rcpt_to in rows:
        try:
            rcpts = json.loads(rcpt_to) if rcpt_to else []
        except ValueError:
            rcpts = []
        if not _agent_rcpt([str(r) for r in rcpts], replies):
            return int(message)
    return None


def _subject(ids: TicketIds, ticket: TicketRecord, agent_subject: str) -> str:
    """The agent's subject when it still carries the tag (they may have edited it), else Re: tag + subject."""
    cleaned = " ".join(agent_subject.split())
    if ticket.number in ids.tags_in(cleaned):
        return cleaned
    return f"Re: {ids.tag(ticket.number)} {' '.join(ticket.subject.split())}".strip()


def _header_id(content: bytes) -> str:
    for line in content.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode("ascii")
    raise ValueError("message without a Message-ID")


async def _events(tx: Tx, ticket: int) -> list[EventRecord]:
    rows = await tx.fetchall("SELECT id, ticket, at, kind, actor, detail FROM events WHERE ticket = ? ORDER BY id",
                             (ticket,))
    return [EventRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]



def dkim_signer(config: Config) -> Signer | None:
    """The DKIM signing function for relayed replies when ``dkim:`` is configured."""
    if config.dkim is None:
        return None
    from .dkim import Signer as DkimSigner

    return DkimSigner.from_config(config.dkim).sign
