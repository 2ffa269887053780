"""Never answer a machine: one case per row of the suppression table.

Each case asserts three things: no receipt, an ``autoreply_suppressed`` event
with the exact reason, and the ticket still forwarded to an agent.
"""

from __future__ import annotations

import pytest

from tests.autoreply.conftest import autoreply_yaml, forwards, outcome, receipts, settle
from tests.support.smtp import message, send_message

DSN = ("Content-Type: multipart/report; report-type=delivery-status;\r\n boundary=\"b\"\r\n", "report")
ARF = ("Content-Type: multipart/report; report-type=feedback-report; boundary=\"b\"\r\n", "report")

# (id, extra headers, envelope sender, From, reason)
CASES = [
    ("null-sender", "", "", "Carol <carol@customer.test>", "null_sender"),
    ("auto-submitted", "Auto-Submitted: auto-generated\r\n", None, None, "auto_submitted"),
    ("auto-submitted-replied", "Auto-Submitted: auto-replied (vacation)\r\n", None, None, "auto_submitted"),
    ("dsn", DSN[0], None, None, DSN[1]),
    ("arf", ARF[0], None, None, ARF[1]),
    ("precedence-bulk", "Precedence: bulk\r\n", None, None, "precedence"),
    ("precedence-junk", "Precedence: junk\r\n", None, None, "precedence"),
    ("precedence-list", "Precedence: list\r\n", None, None, "precedence"),
    ("precedence-auto-reply", "Precedence: auto_reply\r\n", None, None, "precedence"),
    ("x-precedence", "X-Precedence: bulk\r\n", None, None, "precedence"),
    ("list-id", "List-Id: <news.customer.test>\r\n", None, None, "list"),
    ("list-unsubscribe", "List-Unsubscribe: <mailto:leave@customer.test>\r\n", None, None, "list"),
    ("xars-all", "X-Auto-Response-Suppress: All\r\n", None, None, "suppress_header"),
    ("xars-autoreply", "X-Auto-Response-Suppress: DR, AutoReply\r\n", None, None, "suppress_header"),
    ("xars-oof", "X-Auto-Response-Suppress: OOF\r\n", None, None, "suppress_header"),
    ("x-autoreply", "X-Autoreply: yes\r\n", None, None, "autoreply_header"),
    ("x-autorespond", "X-Autorespond: on\r\n", None, None, "autoreply_header"),
    ("x-loop", "X-Loop: helpdesk@customer.test\r\n", None, None, "loop_header"),
    ("rt-loop", "X-RT-Loop-Prevention: Customer RT\r\n", None, None, "loop_header"),
    ("otrs-loop", "X-OTRS-Loop: yes\r\n", None, None, "loop_header"),
    ("mailer-daemon", "", "mailer-daemon@customer.test", "MAILER-DAEMON@customer.test", "robot_sender"),
    ("postmaster", "", "postmaster@customer.test", "postmaster@customer.test", "robot_sender"),
    ("abuse", "", "abuse@customer.test", "abuse@customer.test", "robot_sender"),
    ("root", "", "root@customer.test", "root@customer.test", "robot_sender"),
    ("noreply", "", "noreply@customer.test", "No Reply <no-reply@customer.test>", "robot_sender"),
    ("do-not-reply", "", "do-not-reply@customer.test", "do-not-reply@customer.test", "robot_sender"),
    ("donotreply-from", "", "carol@customer.test", "DoNotReply@customer.test", "robot_sender"),
    ("bounce", "", "bounces+12345@customer.test", "Carol <carol@customer.test>", "robot_sender"),
    ("owner", "", "owner-news@customer.test", "owner-news@customer.test", "robot_sender"),
    ("request", "", "news-request@customer.test", "news-request@customer.test", "robot_sender"),
    ("own-address", "", "help@example.test", "help@example.test", "own_address"),
    ("own-domain", "", "sales@example.test", "sales@example.test", "own_address"),
    ("own-hostname", "", "cron@gw.example.test", "cron@gw.example.test", "own_address"),
]


class TestSuppressionTable:
    @pytest.mark.parametrize("extra, mail_from, sender, reason",
                             [pytest.param(*c[1:], id=c[0]) for c in CASES])
    async def test_no_receipt_but_the_ticket_is_forwarded(self, gateway_factory, extra, mail_from, sender,
                                                          reason) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        envelope = "carol@customer.test" if mail_from is None else mail_from
        raw = message(sender=sender or "Carol <carol@customer.test>", extra=extra)
        [reply] = await _send(gw.smtp_port, raw, envelope)
        assert reply.code == 250
        event = await outcome(gw.store, 1000)
        assert (event.kind, event.detail["reason"]) == ("autoreply_suppressed", reason)
        await settle(gw.sink, 1)
        assert [r.rcpt_tos[0].rpartition("@")[2] for r in forwards(gw.sink)] == ["agents.example.test"]
        assert len(gw.sink.received) == 1

    async def test_bcc_bulk_mail_naming_no_support_address(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        raw = message().replace(b"To: support@example.test", b"To: everyone@customer.test")
        assert (await send_message(gw.smtp_port, raw))[0].code == 250
        event = await outcome(gw.store, 1000)
        assert event.detail["reason"] == "not_addressed"
        await settle(gw.sink, 1)
        assert len(forwards(gw.sink)) == 1 and receipts(gw.sink) == []

    async def test_support_address_in_cc_counts(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        raw = message(extra="Cc: Support <SUPPORT@example.test>\r\n").replace(
            b"To: support@example.test", b"To: boss@customer.test")
        assert (await send_message(gw.smtp_port, raw))[0].code == 250
        assert (await outcome(gw.store, 1000)).kind == "receipt_queued"

    async def test_auto_submitted_no_is_a_person(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        assert (await send_message(gw.smtp_port, message(extra="Auto-Submitted: no\r\n")))[0].code == 250
        assert (await outcome(gw.store, 1000)).kind == "receipt_queued"

    async def test_the_sender_list_is_configurable(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml(more="") .replace(
            "autoreply:\n", "autoreply:\n  suppress_senders: [\"^carol$\"]\n"))
        assert (await send_message(gw.smtp_port, message()))[0].code == 250
        assert (await outcome(gw.store, 1000)).detail["reason"] == "robot_sender"

    async def test_suppressions_are_counted_by_reason(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        assert (await send_message(gw.smtp_port, message(extra="Precedence: bulk\r\n")))[0].code == 250
        await outcome(gw.store, 1000)
        value = gw.daemon.metrics.registry.get_sample_value(
            "gatewayd_autoreplies_total", {"result": "suppressed", "reason": "precedence"})
        assert value == 1


async def _send(port: int, raw: bytes, mail_from: str):
    if mail_from:
        return await send_message(port, raw, mail_from=mail_from)
    from tests.support.smtp import Client

    client = await Client.connect(port)
    try:
        await client.greet()
        assert (await client.cmd("MAIL FROM:<>")).code == 250
        assert (await client.cmd("RCPT TO:<support@example.test>")).code == 250
        return await client.data(raw)
    finally:
        await client.close()
