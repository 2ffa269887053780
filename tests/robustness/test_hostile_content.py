"""Absurd and hostile message content: a clear reply for each, a responsive server, nothing accepted lost."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tests.support.forward import is_forward_of
from tests.support.probe import Bystander, fresh_session_answers
from tests.support.smtp import Client, message

pytestmark = pytest.mark.slow


def many_recipients(count: int) -> bytes:
    folded = ",\r\n ".join(f"user{n}@customer.test" for n in range(count))
    return (f"From: carol@customer.test\r\nTo: {folded}\r\nSubject: everyone\r\n"
            f"Message-ID: <many{count}@customer.test>\r\n\r\nHi all.\r\n").encode()


def deep_multipart(depth: int) -> bytes:
    lines = ["From: carol@customer.test", "To: support@example.test", "Subject: nested",
             "Message-ID: <deep@customer.test>", "MIME-Version: 1.0",
             'Content-Type: multipart/mixed; boundary="b0"', ""]
    for level in range(1, depth):
        lines += [f"--b{level - 1}", f'Content-Type: multipart/mixed; boundary="b{level}"', ""]
    lines += [f"--b{depth - 1}", "Content-Type: text/plain", "", "the innermost text", f"--b{depth - 1}--"]
    lines += [f"--b{level}--" for level in range(depth - 2, -1, -1)]
    return ("\r\n".join(lines) + "\r\n").encode()


UNKNOWN_CHARSETS = (
    b"From: =?x-klingon?q?K=F6r?= <carol@customer.test>\r\nTo: support@example.test\r\n"
    b"Subject: =?x-unknown-42?b?3q2+7w==?= and =?utf-8?q?valid?=\r\nMessage-ID: <cs@customer.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"x-no-such-charset\"\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n\xde\xad\xbe\xef caf\xe9\r\n")

LATIN1_8BIT = (
    b"From: carol@customer.test\r\nTo: support@example.test\r\nSubject: Gr\xfc\xdfe\r\n"
    b"Message-ID: <8bit@customer.test>\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nSch\xf6ne Gr\xfc\xdfe aus K\xf6ln\r\n")

UTF8_MESSAGE = (
    "From: José <josé@cliente.test>\r\nTo: support@example.test\r\nSubject: ¿Dónde está mi pedido? 📦\r\n"
    "Message-ID: <utf8@cliente.test>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    "Mi pedido no llegó. 谢谢\r\n").encode()


@dataclass(frozen=True)
class Case:
    content: bytes
    code: int
    enhanced: str | None
    mail_from: str = "<carol@customer.test>"
    mail_params: str = ""
    limits: str = ""


NOT_UTF8_IDS = (
    b"From: carol@customer.test\r\nTo: support@example.test\r\nSubject: ids\r\n"
    b"Message-ID: <\xd8\xff@customer.test>\r\nIn-Reply-To: <\x9a@x.test>\r\nReferences: <\xfe\xfe@x.test>\r\n"
    b"\r\nbody\r\n")

CASES = {
    "100k-address-To-over-header-limit": Case(many_recipients(100_000), 552, "5.3.4"),
    "100k-address-To-with-raised-limit": Case(many_recipients(100_000), 250, "2.0.0",
                                              limits="  max_header_size: 4000000\n"),
    "1000-deep-multipart": Case(deep_multipart(1000), 250, "2.0.0"),
    "unknown-charsets": Case(UNKNOWN_CHARSETS, 250, "2.0.0", mail_params=" BODY=8BITMIME"),
    "nul-bytes": Case(message(body="before\x00after\r\n"), 550, "5.6.0"),
    "nul-bytes-normalized": Case(message(body="before\x00after\r\n"), 250, "2.0.0",
                                 limits="  bare_newlines: normalize\n"),
    "1500-char-line": Case(message(body="x" * 1500 + "\r\n"), 500, None),
    "998-char-line": Case(message(body="x" * 998 + "\r\n"), 250, "2.0.0"),
    "8bitmime": Case(LATIN1_8BIT, 250, "2.0.0", mail_params=" BODY=8BITMIME"),
    "smtputf8": Case(UTF8_MESSAGE, 250, "2.0.0", mail_from="<josé@cliente.test>",
                     mail_params=" SMTPUTF8 BODY=8BITMIME"),
    "message-id-not-utf8": Case(NOT_UTF8_IDS, 250, "2.0.0", mail_params=" BODY=8BITMIME"),
    "headers-only-no-body": Case(b"From: carol@customer.test\r\nSubject: no body\r\n", 250, "2.0.0"),
}


async def transact(port: int, case: Case) -> tuple[int, str]:
    client = await Client.connect(port)
    try:
        await client.greet()
        mail = await client.cmd(f"MAIL FROM:{case.mail_from}{case.mail_params}")
        assert mail.code == 250, mail
        assert (await client.cmd("RCPT TO:<support@example.test>")).code == 250
        [reply] = await client.data(case.content)
        after = await client.cmd("RSET")
        assert after.code == 250, "the session stays usable after the reply"
        return reply.code, reply.text
    finally:
        await client.close()


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_content_gets_a_clear_reply_and_never_stalls_other_sessions(gateway_factory, name):
    case = CASES[name]
    gw = await gateway_factory(limits=case.limits) if case.limits else await gateway_factory()
    async with Bystander(gw.smtp_port) as bystander:
        code, text = await asyncio.wait_for(transact(gw.smtp_port, case), 60)
        if code == 250:
            [forward] = await gw.sink.wait_for(1, timeout=30)
    bystander.assert_responsive()
    await fresh_session_answers(gw.smtp_port)

    assert code == case.code, text
    if case.enhanced:
        assert text.startswith(case.enhanced), text
    stored = await gw.store.fetchone("SELECT count(*) FROM messages")
    assert stored[0] == (1 if code == 250 else 0)
    if code == 250:
        expected = case.content.replace(b"\x00", b"") if "normalize" in case.limits else case.content
        assert is_forward_of(forward.content, expected), "the forward is the accepted bytes, unchanged"
