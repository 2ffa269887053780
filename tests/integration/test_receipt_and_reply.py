"""Receipts and agent replies between real servers, read back from the customer's Dovecot mailbox.

    customer --swaks--> (Postfix MX --LMTP-->) gatewayd --relay--> Postfix --LMTP--> Dovecot "carol"
    agent    --swaks--> (Postfix MX --LMTP-->) gatewayd --relay--> Postfix --LMTP--> Dovecot "carol"

Each flow runs with Postfix in front (LMTP over TCP and over the unix socket)
and with gatewayd as the MX itself (plain SMTP and STARTTLS with a
self-signed certificate). What the customer receives is checked as stored by
Dovecot, so DKIM is verified after two Postfix hops, with the public key
looked up in the test's loopback DNS.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timezone
from typing import Any

import pytest

from gatewayd.reply_address import ReplyToken, reply_addresses
from tests.integration.conftest import CUSTOMER, FIRST_RESPONSE_HOURS, SUPPORT, Mail, MailPath

pytestmark = pytest.mark.slow

AGENTS = ("alice", "bob")
SUBJECT = "Printer on fire"
CUSTOMER_MESSAGE_ID = "<fire-1@customer.test>"
AGENT_TEXT = "Unplug it, wait ten minutes, then plug it in again."


def token(path: MailPath, address: str) -> ReplyToken | None:
    """What a signed reply address stands for, checked with the running gateway's secret."""
    support = path.gateway.config.support
    return reply_addresses(support.addresses, support.reply_secret).verify(address)


def is_receipt(m: Mail) -> bool:
    return m.get("Auto-Submitted") == "auto-replied"


def is_forward(m: Mail) -> bool:
    return "X-Gatewayd-Agent" in m


def is_agent_reply(m: Mail) -> bool:
    return "X-Gatewayd-Ticket" in m and "Auto-Submitted" not in m


def address_of(m: Mail, header: str) -> str:
    [address] = m[header].addresses
    return address.addr_spec


def text_of(m: Mail) -> str:
    body = m.get_body(preferencelist=("plain",))
    assert body is not None, f"no text/plain part in {m['Subject']!r}"
    return body.get_content()


async def assert_signed_by_the_support_domain(path: MailPath, m: Mail) -> None:
    signature = str(m["DKIM-Signature"] or "")
    assert "d=example.test" in signature.replace(" ", ""), signature
    assert await path.dkim_verifies(m), f"DKIM-Signature does not verify after Postfix and Dovecot:\n{m.raw!r}"


async def assert_sent_through_the_relay_port(path: MailPath, m: Mail) -> None:
    """Postfix took the message from gatewayd on the relay port (its log tag), not on the MX port."""
    queue_ids = re.findall(r"by mx\.example\.test \(Postfix\) with E?SMTPS? id (\w+)", str(m.get_all("Received")))
    assert len(queue_ids) == 1, m.get_all("Received")
    pattern = re.compile(rf"postfix/gatewayd/smtpd\[\d+\]: {queue_ids[0]}: client=localhost\[127\.0\.0\.1\]")
    deadline = asyncio.get_running_loop().time() + 5
    while not pattern.search(path.postfix.log.read_text()):
        assert asyncio.get_running_loop().time() < deadline, f"{queue_ids[0]} did not come in on the relay port"
        await asyncio.sleep(0.1)


async def assert_receipt(path: MailPath) -> None:
    """Exactly one receipt for SUP-1000 in carol's mailbox, as RFC 3834 and the SLA promise it."""
    [(_, receipt)] = await path.wait_for_mail(("carol",), is_receipt)
    ticket = await path.gateway.store.ticket(1000)
    assert ticket is not None and ticket.customer == CUSTOMER
    assert receipt["X-Gatewayd-Ticket"] == "SUP-1000"
    assert str(receipt["Subject"]) == f"[SUP-1000] Re: {SUBJECT}"
    assert address_of(receipt, "From") == SUPPORT
    assert address_of(receipt, "To") == CUSTOMER
    assert receipt["Return-Path"] == "<>", "a receipt goes out with the null sender, so it can never be bounced"
    assert receipt["In-Reply-To"] == CUSTOMER_MESSAGE_ID
    assert token(path, address_of(receipt, "Reply-To")) == ReplyToken(1000, "customer", None)
    await assert_signed_by_the_support_domain(path, receipt)
    text = text_of(receipt)
    due = datetime.fromtimestamp(ticket.created_at + FIRST_RESPONSE_HOURS * 3600, timezone.utc)
    assert "SUP-1000" in text
    assert due.strftime("%A %H:%M UTC") in text, f"the receipt does not promise an answer by {due}:\n{text}"
    assert "_dmarc.customer.test." in path.dns.queries, "gatewayd's DMARC lookup went to the loopback DNS"
    await assert_sent_through_the_relay_port(path, receipt)


async def reply_as_the_agent(path: MailPath, *, port: int,
                             extra: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """The agent answers the forward from their mailbox: to its Reply-To, quoting its subject.

    Returns the agent's name, the signed reply address they wrote to and the swaks transcript.
    """
    [(agent, forward)] = await path.wait_for_mail(AGENTS, is_forward)
    reply_to = address_of(forward, "Reply-To")
    assert token(path, reply_to) == ReplyToken(1000, "agent", agent)
    transcript = await path.swaks(port=port, sender=f"{agent}@agents.example.test", to=reply_to,
                                  subject=f"Re: {forward['Subject']}",
                                  body=f"Hello Carol,\n\n{AGENT_TEXT}\n\n{agent.title()}\n",
                                  headers=(f"In-Reply-To: {forward['Message-ID']}",), extra=extra)
    return agent, reply_to, transcript


async def assert_reply_reached_the_customer(path: MailPath, agent: str, reply_to: str) -> None:
    """The customer gets the agent's words from the support address, threaded and signed, never the agent's
    own address or reply address; the ticket's audit trail records the first response."""
    [(_, reply)] = await path.wait_for_mail(("carol",), is_agent_reply)
    assert address_of(reply, "From") == SUPPORT
    assert reply["From"].addresses[0].display_name == f"{agent.title()} via Support"
    assert address_of(reply, "To") == CUSTOMER
    assert reply["X-Gatewayd-Ticket"] == "SUP-1000"
    assert "[SUP-1000]" in str(reply["Subject"])
    assert reply["In-Reply-To"] == CUSTOMER_MESSAGE_ID
    assert CUSTOMER_MESSAGE_ID in str(reply["References"])
    assert token(path, address_of(reply, "Reply-To")) == ReplyToken(1000, "customer", None)
    assert reply["Return-Path"] == "<bounces@example.test>"
    assert AGENT_TEXT in text_of(reply)
    for hidden in (f"{agent}@agents.example.test", reply_to):
        assert hidden.encode() not in reply.raw.lower(), f"the customer can see {hidden}"
    await assert_signed_by_the_support_domain(path, reply)
    await assert_sent_through_the_relay_port(path, reply)
    assert [t.number for t in await path.gateway.store.tickets()] == [1000], "the agent's mail opened a ticket"

    shown = await audit_trail(path, lambda e: e["kind"] == "delivered" and e["detail"]["kind"] == "reply")
    assert shown["ticket"]["agent"] == agent and shown["ticket"]["status"] == "open"
    events = shown["events"]
    kinds = [e["kind"] for e in events]
    [replied] = [e for e in events if e["kind"] == "replied"]
    assert replied["actor"] == agent and replied["detail"]["rcpt"] == CUSTOMER
    assert kinds.index("message_received") < kinds.index("routed") < kinds.index("agent_mail_received") \
        < kinds.index("replied")
    [acked] = [e for e in events if e["kind"] == "acked"]
    assert acked["actor"] == agent and acked["detail"] == {"via": "reply"}, "the reply acknowledges the ticket"
    [delivered] = [e for e in events if e["kind"] == "delivered" and e["detail"]["kind"] == "reply"]
    assert delivered["detail"]["rcpt"] == CUSTOMER and delivered["detail"]["reply"].startswith("250 ")


async def audit_trail(path: MailPath, until: Any, timeout: float = 15) -> dict[str, Any]:
    """``gatewayd tickets show SUP-1000 --json``, re-run until an event satisfies ``until``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        shown = await path.tickets_show("SUP-1000")
        if any(until(e) for e in shown["events"]):
            return shown
        assert asyncio.get_running_loop().time() < deadline, f"audit trail incomplete: {shown['events']}"
        await asyncio.sleep(0.2)


class TestPostfixInFront:
    """Customer and agent write to the MX; gatewayd gets the mail from Postfix over LMTP."""

    @pytest.mark.parametrize("lmtp", ["tcp", "unix"])
    async def test_the_customer_gets_a_signed_receipt_from_the_support_address(self, mail_path, lmtp):
        path = await mail_path(lmtp=lmtp)
        await path.inject(port=path.postfix.port, subject=SUBJECT, message_id=CUSTOMER_MESSAGE_ID)
        await assert_receipt(path)

    async def test_the_customers_answer_to_the_receipt_reaches_the_agent_on_the_same_ticket(self, mail_path):
        path = await mail_path()
        await path.inject(port=path.postfix.port, subject=SUBJECT, message_id=CUSTOMER_MESSAGE_ID)
        [(_, receipt)] = await path.wait_for_mail(("carol",), is_receipt)
        [(agent, _)] = await path.wait_for_mail(AGENTS, is_forward)
        await path.swaks(port=path.postfix.port, to=address_of(receipt, "Reply-To"),
                         subject=f"Re: {receipt['Subject']}", body="It is still smoking.",
                         headers=(f"In-Reply-To: {receipt['Message-ID']}",))
        [(owner, followup)] = await path.wait_for_mail(AGENTS, lambda m: is_forward(m) and "still smoking" in
                                                       text_of(m))
        assert owner == agent and followup["X-Gatewayd-Ticket"] == "SUP-1000"
        assert [t.number for t in await path.gateway.store.tickets()] == [1000]

    @pytest.mark.parametrize("lmtp", ["tcp", "unix"])
    async def test_the_agents_reply_reaches_the_customer_from_the_support_address(self, mail_path, lmtp):
        path = await mail_path(lmtp=lmtp)
        await path.inject(port=path.postfix.port, subject=SUBJECT, message_id=CUSTOMER_MESSAGE_ID)
        agent, reply_to, _ = await reply_as_the_agent(path, port=path.postfix.port)
        await assert_reply_reached_the_customer(path, agent, reply_to)
        [agent_mail] = [m for m in await path.gateway.store.messages(1000) if reply_to in m.rcpt_to]
        assert agent_mail.listener == ("lmtp-socket" if lmtp == "unix" else "lmtp")


class TestGatewaydAsMx:
    """Customer and agent write to gatewayd's SMTP listener directly; only the relay is Postfix."""

    @pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
    async def test_the_customer_gets_a_signed_receipt_from_the_support_address(self, mail_path, certificate, tls):
        path = await mail_path(tls=certificate if tls else None)
        transcript = await path.inject(port=path.gateway.smtp_port, subject=SUBJECT, message_id=CUSTOMER_MESSAGE_ID,
                                       extra=("--tls",) if tls else ())
        assert ("<~  250 2.0.0 Ok: queued as SUP-1000" if tls else "<-  250 2.0.0 Ok: queued as SUP-1000") \
            in transcript
        await assert_receipt(path)

    @pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
    async def test_the_agents_reply_reaches_the_customer_from_the_support_address(self, mail_path, certificate, tls):
        path = await mail_path(tls=certificate if tls else None)
        extra = ("--tls",) if tls else ()
        await path.inject(port=path.gateway.smtp_port, subject=SUBJECT, message_id=CUSTOMER_MESSAGE_ID, extra=extra)
        agent, reply_to, transcript = await reply_as_the_agent(path, port=path.gateway.smtp_port, extra=extra)
        assert ("<~  250 2.0.0 Ok: queued as SUP-1000" if tls else "<-  250 2.0.0 Ok: queued as SUP-1000") \
            in transcript
        await assert_reply_reached_the_customer(path, agent, reply_to)
