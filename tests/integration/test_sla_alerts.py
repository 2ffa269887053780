"""What the SLA clocks send, between real servers: a re-offer when nobody acknowledged in time, and the
overdue alert in the team supervisor's Dovecot mailbox.

    SLA scan (fake clock) → gatewayd outbox --relay--> Postfix --LMTP--> Dovecot "alice"/"bob"/"lead"

The supervisors here have mailboxes outside the support domain (lead@agents.example.test): mail for the
support domain goes to gatewayd, which takes only its support addresses.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.conftest import FIRST_RESPONSE_HOURS, MailPath
from tests.integration.test_receipt_and_reply import (AGENTS, SUBJECT, address_of, assert_sent_through_the_relay_port,
                                                      assert_signed_by_the_support_domain, audit_trail, is_forward,
                                                      text_of)

pytestmark = pytest.mark.slow

SUPERVISORS = ("lead@agents.example.test", "ciso@agents.example.test")
ACK_MINUTES = 15  # GATEWAYD_EXTRA's sla.ack


def at(path: MailPath, seconds: float) -> None:
    """Moves the SLA scanner's and the outbox's clock (both), so what a scan queues is due at once."""
    path.gateway.daemon.sla.clock = lambda: seconds
    path.gateway.daemon.outbox.clock = lambda: seconds


async def opened(mail_path: Any) -> tuple[MailPath, str, float]:
    """A customer's message through the MX, forwarded to one agent; that agent and the ticket's creation time."""
    path = await mail_path(supervisors=SUPERVISORS)
    await path.inject(port=path.postfix.port, subject=SUBJECT, message_id="<sla-1@customer.test>")
    [(agent, _)] = await path.wait_for_mail(AGENTS, is_forward)
    ticket = await path.gateway.store.ticket(1000)
    assert ticket is not None
    return path, agent, ticket.created_at


class TestMissedAcknowledgement:
    async def test_the_ticket_is_re_offered_to_the_other_agent_and_the_first_is_told(self, mail_path):
        path, first, created = await opened(mail_path)
        [second] = [a for a in AGENTS if a != first]
        at(path, created + (ACK_MINUTES + 1) * 60)
        assert await path.gateway.daemon.sla.scan() == (1, 0)

        [(_, offer)] = await path.wait_for_mail((second,), is_forward)
        assert offer["X-Gatewayd-Ticket"] == "SUP-1000" and offer["X-Gatewayd-Agent"] == second
        assert "Please help." in text_of(offer)
        [(_, notice)] = await path.wait_for_mail((first,), lambda m: "re-offered" in str(m["Subject"]))
        assert notice["Auto-Submitted"] == "auto-generated"
        await assert_signed_by_the_support_domain(path, notice)
        await assert_sent_through_the_relay_port(path, notice)
        ticket = await path.gateway.store.ticket(1000)
        assert ticket is not None and ticket.agent == second


class TestOverdue:
    async def test_the_team_supervisor_gets_one_signed_alert_in_their_mailbox(self, mail_path):
        path, agent, created = await opened(mail_path)
        reply_to = address_of(next(m for _, m in await path.wait_for_mail((agent,), is_forward)), "Reply-To")
        await path.swaks(port=path.postfix.port, sender=f"{agent}@agents.example.test", to=reply_to,
                         subject=f"Re: [SUP-1000] {SUBJECT}", body="#ack\n")
        await audit_trail(path, lambda e: e["kind"] == "acked")

        at(path, created + (FIRST_RESPONSE_HOURS + 1) * 3600)
        sla = path.gateway.daemon.sla
        assert await sla.scan() == (0, 1)
        assert await sla.scan() == (0, 0)

        [(_, alert)] = await path.wait_for_mail(("lead",), lambda m: "overdue" in str(m["Subject"]))
        assert str(alert["Subject"]).startswith("[SUP-1000] overdue: no response to carol@customer.test")
        assert alert["Auto-Submitted"] == "auto-generated"
        assert address_of(alert, "To") == SUPERVISORS[0]
        text = text_of(alert)
        assert "SUP-1000" in text and SUBJECT in text and agent in text
        await assert_signed_by_the_support_domain(path, alert)
        await assert_sent_through_the_relay_port(path, alert)
        assert await asyncio.to_thread(path.fetch, "ciso") == [], "only the ticket's team supervisor is alerted"
        assert len(await asyncio.to_thread(path.fetch, "lead")) == 1

