"""Python 3.11.7's email package is vulnerable to CVE-2024-6923 and CVE-2023-27043; gatewayd must not be."""

from __future__ import annotations

import email
import email.policy

import pytest

from tests.support.smtp import Client, message, send_message

pytestmark = pytest.mark.slow

INJECTING_SUBJECTS = [
    "=?utf-8?q?Invoice=0D=0ABcc:_evil@attacker.test?=",
    "=?utf-8?b?SW52b2ljZQ0KQmNjOiBldmlsQGF0dGFja2VyLnRlc3Q=?=",
    "=?utf-8?q?Invoice=0ABcc:_evil@attacker.test=0A=0Ahidden_body?=",
    "=?iso-8859-1?q?Invoice=0DBcc:_evil@attacker.test?=",
]


def header_lines(content: bytes) -> list[bytes]:
    return content.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


class TestEncodedHeaderInjection:
    """CVE-2024-6923: an RFC 2047 word that decodes to CR/LF must never become a header of its own."""

    @pytest.mark.parametrize("subject", INJECTING_SUBJECTS)
    async def test_an_encoded_crlf_subject_never_adds_a_field_or_a_recipient(self, gateway, subject):
        [reply] = await send_message(gateway.smtp_port, message(subject))
        assert reply.code == 250
        [forward] = await gateway.sink.wait_for(1)

        assert forward.rcpt_tos == ["alice@agents.example.test"]
        assert not any(line.lower().startswith(b"bcc") for line in header_lines(forward.content))
        parsed = email.message_from_bytes(forward.content, policy=email.policy.default)
        assert parsed["Bcc"] is None
        assert b"Subject: [SUP-1000] " + subject.encode() + b"\r\n" in forward.content
        ticket = await gateway.store.ticket(1000)
        assert "\r" not in ticket.subject and "\n" not in ticket.subject

    async def test_an_encoded_crlf_display_name_never_adds_a_field(self, gateway):
        sender = "=?utf-8?q?Carol=0D=0ABcc:_evil@attacker.test?= <carol@customer.test>"
        [reply] = await send_message(gateway.smtp_port, message(sender=sender))
        assert reply.code == 250
        [forward] = await gateway.sink.wait_for(1)
        assert forward.rcpt_tos == ["alice@agents.example.test"]
        assert not any(line.lower().startswith(b"bcc") for line in header_lines(forward.content))
        assert (await gateway.store.ticket(1000)).customer == "carol@customer.test"


class TestAddressConfusion:
    """CVE-2023-27043: ``alice@example.org)<bob@example.org>`` is never read as bob."""

    @pytest.mark.parametrize("address", [
        "alice@example.org)<bob@example.org>",
        "alice@example.org)<bob@example.org",
        "alice@example.org(<bob@example.org>",
    ])
    async def test_the_envelope_never_reads_the_confusing_sender_as_bob(self, gateway, address):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        reply = await client.cmd(f"MAIL FROM:<{address}>")
        if reply.code == 250:
            await client.cmd("RCPT TO:<support@example.test>")
            [accepted] = await client.data(message())
            assert accepted.code == 250
        await client.close()
        assert reply.code in (250, 501, 553), reply
        senders = {r[0] for r in await gateway.store.fetchall("SELECT mail_from FROM messages")}
        assert senders <= {"alice@example.org"}, "refused, or read as the address outside any comment"

    async def test_the_envelope_refuses_the_confusing_recipient(self, gateway):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        await client.cmd("MAIL FROM:<carol@customer.test>")
        reply = await client.cmd("RCPT TO:<alice@example.org)<support@example.test>>")
        await client.close()
        assert reply.code in (501, 553), reply

    @pytest.mark.parametrize("header", [
        "alice@example.org)<bob@example.org>",
        "alice@example.org, bob@example.org",
        '"bob@example.org" <alice@example.org>, <bob@example.org>',
    ])
    async def test_a_confusing_from_header_never_makes_bob_a_participant(self, gateway, header):
        [reply] = await send_message(gateway.smtp_port, message(sender=header), mail_from="alice@example.org")
        assert reply.code == 250
        ticket = await gateway.store.ticket(1000)
        assert ticket.customer == "alice@example.org"
        people = {r[0] for r in await gateway.store.fetchall("SELECT address FROM participants WHERE ticket = 1000")}
        assert "bob@example.org" not in people

        followup = message("Re: [SUP-1000] about that", sender="bob@example.org", message_id="<bob@example.org>")
        [second] = await send_message(gateway.smtp_port, followup, mail_from="bob@example.org")
        assert second.code == 250 and not second.text.endswith("SUP-1000"), \
            "bob never took part, so his use of the tag opens a ticket of his own"
