"""A new ticket gets one receipt: what it says, its headers, whom it goes to, and what never gets in."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

from gatewayd.addresses import extract_address
from gatewayd.rawmessage import fields, header_block
from tests.autoreply.conftest import autoreply_yaml, forwards, outcome, receipts, settle
from tests.support.smtp import message, send_message

ENCODED_CRLF_SUBJECT = "=?utf-8?q?Hello=0D=0ABcc:_victim@evil.test?="
CVE_2023_27043_FROM = "alice@example.org)<bob@example.org>"


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=policy.SMTP)  # type: ignore[return-value]


def header_names(data: bytes) -> list[str]:
    block = header_block(data)
    return [f.name for f in fields(block)]


async def one_receipt(gw, raw: bytes, *, mail_from: str = "carol@customer.test",
                      rcpts: tuple[str, ...] = ("support@example.test",), rcpt: str = "carol@customer.test"):
    [reply] = await send_message(gw.smtp_port, raw, mail_from=mail_from, rcpts=rcpts)
    assert reply.code == 250, reply
    event = await outcome(gw.store, 1000)
    assert event.kind == "receipt_queued", event
    await settle(gw.sink, 2)
    [receipt] = receipts(gw.sink, rcpt)
    return receipt


class TestReceiptContents:
    async def test_headers_follow_rfc_3834_and_the_contract(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        receipt = await one_receipt(gw, message("Printer on fire", message_id="<m1@customer.test>"))
        parsed = parse(receipt.content)
        assert receipt.mail_from in ("", "<>")
        assert parsed["From"] == "support@example.test"
        assert parsed["To"] == "Carol <carol@customer.test>"
        assert parsed["Subject"] == "[SUP-1000] Re: Printer on fire"
        assert parsed["Auto-Submitted"] == "auto-replied"
        assert parsed["X-Auto-Response-Suppress"] == "All"
        assert parsed["X-Gatewayd-Ticket"] == "SUP-1000"
        assert parsed["In-Reply-To"] == "<m1@customer.test>"
        assert parsed["References"].split() == ["<m1@customer.test>", "<SUP-1000@gw.example.test>"]
        assert gw.daemon.router.ids.ticket_of_message_id(parsed["Message-ID"]) == 1000
        assert parsed["Date"]

    async def test_reply_to_is_the_customers_signed_address_and_a_reply_to_it_threads(self, gateway_factory) -> None:
        """Even when a mail client strips the subject tag and the threading headers."""
        gw = await gateway_factory(extra=autoreply_yaml())
        receipt = await one_receipt(gw, message("Printer on fire"))
        reply_to = parse(receipt.content)["Reply-To"]
        assert reply_to.startswith("support+") and reply_to.endswith("@example.test")
        [reply] = await send_message(gw.smtp_port, message("still broken", message_id="<m2@customer.test>"),
                                     rcpts=(reply_to,))
        assert reply.text.endswith("SUP-1000")

    async def test_text_and_html_parts_name_ticket_customer_team_and_time(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        receipt = await one_receipt(gw, message())
        parsed = parse(receipt.content)
        assert parsed.get_content_type() == "multipart/alternative"
        text = parsed.get_body(("plain",)).get_content()
        html = parsed.get_body(("html",)).get_content()
        for part in (text, html):
            assert "SUP-1000" in part
            assert "Hello Carol," in part
            assert "support team" in part
            assert "by " in part
        assert "$" not in text

    async def test_the_ticket_is_forwarded_as_well(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        await one_receipt(gw, message())
        [forward] = forwards(gw.sink)
        assert forward.rcpt_tos[0].endswith("@agents.example.test")

    async def test_from_is_the_support_address_the_customer_wrote_to(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        raw = message().replace(b"To: support@example.test", b"To: help@example.test")
        receipt = await one_receipt(gw, raw, rcpts=("help@example.test",))
        assert parse(receipt.content)["From"] == "help@example.test"

    async def test_per_team_template_override(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml(), routing=(
            "  - plugin: rules\n    rules:\n      - match: {subject: \"(?i)phishing\"}\n        team: security\n"
            "  - plugin: round_robin\n"))
        receipt = await one_receipt(gw, message("Phishing mail from 'your bank'"))
        text = parse(receipt.content).get_body(("plain",)).get_content()
        assert "security team as ticket\r\nSUP-1000" in text
        assert "block your card" in text

    async def test_a_follow_up_gets_no_receipt_by_default(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        await one_receipt(gw, message())
        followup = message("Re: [SUP-1000] Printer on fire", message_id="<m2@customer.test>")
        assert (await send_message(gw.smtp_port, followup))[0].code == 250
        await settle(gw.sink, 3)
        assert len(receipts(gw.sink)) == 1
        assert len(forwards(gw.sink)) == 2

    async def test_a_follow_up_gets_a_short_acknowledgement_when_configured(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml(followups="acknowledge"))
        await one_receipt(gw, message())
        followup = message("Re: [SUP-1000] Printer on fire", message_id="<m2@customer.test>")
        assert (await send_message(gw.smtp_port, followup))[0].code == 250
        await settle(gw.sink, 4)
        first, second = receipts(gw.sink)
        text = parse(second.content).get_body(("plain",)).get_content()
        assert "we have added your message to ticket SUP-1000" in text
        assert parse(second.content)["In-Reply-To"] == "<m2@customer.test>"

    async def test_without_an_autoreply_section_no_receipts(self, gateway_factory) -> None:
        gw = await gateway_factory()
        assert (await send_message(gw.smtp_port, message()))[0].code == 250
        await settle(gw.sink, 1)
        assert receipts(gw.sink) == []


class TestRecipient:
    async def test_reply_to_in_the_senders_domain_is_used(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        raw = message(extra="Reply-To: Carol Desk <desk@customer.test>\r\n")
        receipt = await one_receipt(gw, raw, rcpt="desk@customer.test")
        assert parse(receipt.content)["To"] == "Carol Desk <desk@customer.test>"

    async def test_reply_to_in_a_foreign_domain_is_ignored(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        raw = message(extra="Reply-To: victim@elsewhere.test\r\n")
        receipt = await one_receipt(gw, raw)
        assert parse(receipt.content)["To"] == "Carol <carol@customer.test>"

    async def test_cve_2023_27043_from_never_reaches_the_hidden_address(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        raw = message(sender=CVE_2023_27043_FROM)
        receipt = await one_receipt(gw, raw, mail_from="alice@example.org", rcpt="alice@example.org")
        assert receipt.rcpt_tos == ["alice@example.org"]
        assert b"bob@example.org" not in receipt.content.split(b"\r\n\r\n")[0]
        assert extract_address(parse(receipt.content)["To"]) == "alice@example.org"

    async def test_a_from_header_with_two_addresses_falls_back_to_the_envelope(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        raw = message(sender="carol@customer.test, mallory@customer.test")
        receipt = await one_receipt(gw, raw)
        assert parse(receipt.content)["To"] == "carol@customer.test"


class TestHeaderInjection:
    async def test_encoded_crlf_in_the_subject_stays_one_line(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        receipt = await one_receipt(gw, message(ENCODED_CRLF_SUBJECT))
        names = header_names(receipt.content)
        assert "bcc" not in names
        assert len(names) == len(set(names))
        assert receipt.rcpt_tos == ["carol@customer.test"]
        assert parse(receipt.content)["Subject"] == "[SUP-1000] Re: Hello Bcc: victim@evil.test"

    async def test_encoded_crlf_in_the_display_name_stays_in_the_name(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        sender = "=?utf-8?q?Carol=0D=0ABcc:_victim@evil.test?= <carol@customer.test>"
        receipt = await one_receipt(gw, message(sender=sender))
        names = header_names(receipt.content)
        assert "bcc" not in names and len(names) == len(set(names))
        assert extract_address(parse(receipt.content)["To"]) == "carol@customer.test"
        assert "victim@evil.test" not in str(parse(receipt.content)["To"].addresses[0].addr_spec)

    async def test_a_quoted_name_with_commas_and_brackets_is_one_mailbox(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        receipt = await one_receipt(gw, message(sender='"Doe, Jane <x@evil.test>" <carol@customer.test>'))
        [address] = parse(receipt.content)["To"].addresses
        assert address.addr_spec == "carol@customer.test"
