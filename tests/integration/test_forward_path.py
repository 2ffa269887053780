"""The forward path between real servers: customer → (Postfix →) gatewayd → Postfix → Dovecot → IMAP."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import CUSTOMER, MailPath

pytestmark = pytest.mark.slow

AGENTS = ("alice", "bob")


def is_forward_of(subject: str):
    return lambda m: "X-Gatewayd-Ticket" in m and subject in str(m.get("Subject", ""))


async def assert_forwarded_once(path: MailPath, subject: str, body: str) -> None:
    found = await path.wait_for_mail(AGENTS, is_forward_of(subject))
    [(agent, forward)] = found
    assert forward["X-Gatewayd-Agent"] == agent
    ticket = forward["X-Gatewayd-Ticket"]
    assert str(forward["Subject"]).startswith(f"[{ticket}] ")
    assert forward["X-Original-Subject"] == subject
    assert body in forward.get_content()
    record = await path.gateway.store.ticket(int(ticket.split("-")[1]))
    assert record is not None and record.agent == agent and record.customer == "carol@customer.test"


class TestPostfixInFront:
    @pytest.mark.parametrize("lmtp", ["tcp", "unix"])
    async def test_mail_to_the_mx_becomes_a_ticket_in_one_agents_mailbox(self, mail_path, lmtp):
        path = await mail_path(lmtp=lmtp)
        subject = f"Printer on fire via {lmtp}"
        transcript = await path.inject(port=path.postfix.port, subject=subject, body="It smokes.",
                                       message_id=f"<{lmtp}@customer.test>")
        assert "250 2.0.0 Ok: queued as" in transcript
        await assert_forwarded_once(path, subject, "It smokes.")
        listener = "lmtp-socket" if lmtp == "unix" else "lmtp"
        [message] = await path.gateway.store.messages(1000)
        assert message.listener == listener

    async def test_mail_for_anyone_else_at_the_support_domain_bounces_at_the_mx(self, mail_path):
        path = await mail_path()
        await path.inject(port=path.postfix.port, subject="for nobody", to="nobody@example.test")
        bounce = await path.wait_for_mail(("carol",), lambda m: "Undelivered" in str(m.get("Subject", "")))
        assert "550 5.1.1" in bounce[0][1].as_string()
        assert await path.gateway.store.tickets() == []

    async def test_the_mx_relays_for_nobody_only_gatewayds_relay_port_sends_onwards(self, mail_path):
        path = await mail_path()
        refused = await path.swaks(port=path.postfix.port, subject="Relay me", sender="someone@elsewhere.test",
                                   to=CUSTOMER, expect_ok=False)
        assert f"554 5.7.1 <{CUSTOMER}>: Relay access denied" in refused
        await path.swaks(port=path.relay_port, subject="Sent on by the relay port", sender="bounces@example.test",
                         to=CUSTOMER)
        await path.wait_for_mail(("carol",), lambda m: m["Subject"] == "Sent on by the relay port")


class TestGatewaydAsMx:
    async def test_smtp_straight_to_gatewayd(self, mail_path):
        path = await mail_path()
        transcript = await path.inject(port=path.gateway.smtp_port, subject="Direct", body="No MTA in front.")
        assert "250 2.0.0 Ok: queued as SUP-1000" in transcript
        await assert_forwarded_once(path, "Direct", "No MTA in front.")

    async def test_starttls_with_a_self_signed_certificate(self, mail_path, certificate):
        path = await mail_path(tls=certificate)
        transcript = await path.inject(port=path.gateway.smtp_port, subject="Over TLS", body="Encrypted.",
                                       extra=("--tls",))
        assert "<~  250 2.0.0 Ok: queued as SUP-1000" in transcript, "the DATA reply came over TLS"
        await assert_forwarded_once(path, "Over TLS", "Encrypted.")


class TestRelayOverStarttls:
    """gatewayd's own mail (forwards here) to a relay port that takes mail only over STARTTLS."""

    async def test_forwards_go_over_starttls_to_a_relay_verified_against_ca_file(self, mail_path,
                                                                                 relay_certificate):
        cert, _ = relay_certificate
        path = await mail_path(relay_tls=relay_certificate, relay_extra=f'  starttls: true\n  ca_file: "{cert}"\n')
        await path.inject(port=path.gateway.smtp_port, subject="Relayed over TLS", body="Encrypted onwards.")
        await assert_forwarded_once(path, "Relayed over TLS", "Encrypted onwards.")
        [(_, forward)] = await path.wait_for_mail(AGENTS, is_forward_of("Relayed over TLS"))
        from_gatewayd = [r for r in forward.get_all("Received") if "gw.example.test" in r]
        assert from_gatewayd and "using TLS" in from_gatewayd[0], forward.get_all("Received")

    async def test_a_relay_whose_certificate_is_not_trusted_gets_nothing_and_the_forward_waits(
            self, mail_path, relay_certificate):
        path = await mail_path(relay_tls=relay_certificate, relay_extra="  starttls: true\n")
        await path.inject(port=path.gateway.smtp_port, subject="Not to a stranger", body="Keep this.")
        store = path.gateway.store
        for _ in range(100):
            rows = await store.fetchall("SELECT state, attempts, last_error FROM outbox WHERE kind = 'forward'")
            if rows and rows[0]["attempts"] >= 2:
                break
            await asyncio.sleep(0.1)
        [row] = rows
        assert row["state"] == "pending" and row["attempts"] >= 2
        assert "CERTIFICATE_VERIFY_FAILED" in row["last_error"]
        assert [m for user in AGENTS for m in await asyncio.to_thread(path.fetch, user)] == []
