"""SMTP and LMTP listeners over real sockets: what a client sees, and what reaches the relay."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest

from gatewayd.errors import StoreFull, StoreUnavailable
from gatewayd.intake import Intake
from gatewayd.store import Store
from tests.support.smtp import Client, message, send_message


async def ticket_count(store: Store) -> int:
    row = await store.fetchone("SELECT count(*) FROM tickets")
    assert row is not None
    return int(row[0])


class TestAcceptance:
    async def test_250_names_the_ticket_and_the_forward_carries_the_original_body(self, gateway):
        original = message("Printer on fire", body="Line one\r\n.leading dot\r\n\r\nLast line\r\n")
        [reply] = await send_message(gateway.smtp_port, original)
        assert reply.code == 250
        assert reply.text == "2.0.0 Ok: queued as SUP-1000"

        [forward] = await gateway.sink.wait_for(1)
        assert forward.rcpt_tos == ["alice@agents.example.test"]
        assert forward.mail_from == gateway.config.support.bounce_address
        head, _, body = forward.content.partition(b"\r\n\r\n")
        head += b"\r\n"
        assert body == b"Line one\r\n.leading dot\r\n\r\nLast line\r\n"
        assert b"X-Gatewayd-Ticket: SUP-1000\r\n" in head
        assert b"X-Gatewayd-Agent: alice\r\n" in head
        assert b"Subject: [SUP-1000] Printer on fire\r\n" in head
        assert b"X-Original-Subject: Printer on fire\r\n" in head
        assert b"X-Original-Message-ID: <m1@customer.test>\r\n" in head

    async def test_the_message_is_in_the_store_before_the_reply(self, gateway):
        [reply] = await send_message(gateway.smtp_port, message())
        number = int(reply.text.rsplit("-", 1)[1])
        ticket = await gateway.store.ticket(number)
        assert ticket is not None and ticket.customer == "carol@customer.test"
        [stored] = await gateway.store.messages(number)
        assert await gateway.store.message_raw(stored.id) == message()

    async def test_ehlo_advertises_the_extensions_gatewayd_supports_and_no_auth(self, gateway):
        client = await Client.connect(gateway.smtp_port)
        ehlo = await client.greet()
        await client.close()
        for extension in ("SIZE 33554432", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"):
            assert extension in ehlo.lines
        assert not any(line.startswith("AUTH") for line in ehlo.lines)

    async def test_null_sender_is_accepted(self, gateway):
        [reply] = await send_message(gateway.smtp_port, message(), mail_from="")
        assert reply.code == 250

    async def test_a_follow_up_with_the_tag_goes_to_the_same_agent(self, gateway):
        await send_message(gateway.smtp_port, message("First", message_id="<a@customer.test>"))
        await send_message(gateway.smtp_port, message("Second problem", sender="dave@other.test",
                                                      message_id="<b@other.test>"), mail_from="dave@other.test")
        [follow] = await send_message(gateway.smtp_port, message("Re: [SUP-1000] First", message_id="<c@customer.test>"))
        assert follow.text.endswith("SUP-1000")
        forwards = await gateway.sink.wait_for(3)
        by_ticket = {}
        for forward in forwards:
            ticket = forward.content.split(b"X-Gatewayd-Ticket: ", 1)[1].split(b"\r\n", 1)[0]
            by_ticket.setdefault(ticket, set()).update(forward.rcpt_tos)
        assert by_ticket[b"SUP-1000"] == {"alice@agents.example.test"}
        assert by_ticket[b"SUP-1001"] == {"bob@agents.example.test"}

    async def test_an_upstream_retry_gets_the_same_ticket_and_no_second_forward(self, gateway):
        first = await send_message(gateway.smtp_port, message())
        second = await send_message(gateway.smtp_port, message())
        assert first[0].text == second[0].text == "2.0.0 Ok: queued as SUP-1000"
        await gateway.sink.wait_for(1)
        await asyncio.sleep(0.5)
        assert len(gateway.sink.received) == 1


class TestRecipientPolicy:
    @pytest.mark.parametrize("rcpt", ["someone@elsewhere.test", "alice@agents.example.test", "postmaster@example.test"])
    async def test_mail_for_anyone_but_the_support_addresses_is_refused(self, gateway, rcpt):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        await client.cmd("MAIL FROM:<carol@customer.test>")
        reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        await client.close()
        assert reply.code == 550 and reply.text.startswith("5.1.1")

    async def test_support_addresses_match_case_insensitively(self, gateway):
        [reply] = await send_message(gateway.smtp_port, message(), rcpts=("Support@Example.TEST",))
        assert reply.code == 250

    async def test_more_recipients_than_the_limit_get_452(self, gateway_factory):
        gw = await gateway_factory(limits="  max_recipients: 2\n")
        client = await Client.connect(gw.smtp_port)
        await client.greet()
        await client.cmd("MAIL FROM:<carol@customer.test>")
        replies = [await client.cmd(f"RCPT TO:<{r}>") for r in
                   ("support@example.test", "help@example.test", "support@example.test")]
        await client.close()
        assert [r.code for r in replies] == [250, 250, 452]
        assert replies[2].text.startswith("4.5.3")

    async def test_utf8_address_needs_the_smtputf8_parameter(self, gateway):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        refused = await client.cmd("MAIL FROM:<jörg@customer.test>")
        await client.cmd("RSET")
        accepted = await client.cmd("MAIL FROM:<jörg@customer.test> SMTPUTF8")
        await client.close()
        assert refused.code == 553 and refused.text.startswith("5.6.7")
        assert accepted.code == 250


class TestLmtp:
    async def test_pipelined_transaction_gets_one_reply_per_accepted_recipient(self, gateway):
        client = await Client.connect(gateway.lmtp_port)
        assert (await client.reply()).code == 220
        await client.send(b"LHLO client.test\r\nMAIL FROM:<carol@customer.test>\r\n"
                          b"RCPT TO:<support@example.test>\r\nRCPT TO:<nobody@example.test>\r\n"
                          b"RCPT TO:<help@example.test>\r\nDATA\r\n")
        lhlo = await client.reply()
        assert "PIPELINING" in lhlo.lines and "ENHANCEDSTATUSCODES" in lhlo.lines
        codes = [(await client.reply()).code for _ in range(5)]
        assert codes == [250, 250, 550, 250, 354]
        await client.send(message() + b".\r\n")
        replies = [await client.reply() for _ in range(2)]
        await client.close()
        assert [r.text for r in replies] == ["2.0.0 Ok: queued as SUP-1000"] * 2
        assert await ticket_count(gateway.store) == 1
        assert len(await gateway.sink.wait_for(1)) == 1

    async def test_every_recipient_gets_the_same_temporary_failure(self, gateway, monkeypatch):
        async def broken(self, transaction):
            raise StoreUnavailable("disk I/O error")
        monkeypatch.setattr(Intake, "accept", broken)
        replies = await send_message(gateway.lmtp_port, message(), lmtp=True,
                                     rcpts=("support@example.test", "help@example.test"))
        assert [(r.code, r.text[:5]) for r in replies] == [(451, "4.3.0")] * 2

    async def test_an_unexpected_error_still_answers_every_recipient(self, gateway, monkeypatch):
        async def explode(self, transaction):
            raise RuntimeError("boom")
        monkeypatch.setattr(Intake, "accept", explode)
        replies = await send_message(gateway.lmtp_port, message(), lmtp=True,
                                     rcpts=("support@example.test", "help@example.test"))
        assert [r.code for r in replies] == [451, 451]

    async def test_oversize_data_is_refused_once_per_recipient_and_the_session_stays_in_step(self, gateway_factory):
        gw = await gateway_factory(limits="  max_message_size: 10KB\n")
        client = await Client.connect(gw.lmtp_port)
        await client.greet(lmtp=True)
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.cmd("RCPT TO:<support@example.test>")
        await client.cmd("RCPT TO:<help@example.test>")
        replies = await client.data(message(body="x" * 500 + "\r\n") * 30, rcpt_count=2)
        after = await client.cmd("NOOP")
        await client.close()
        assert [r.code for r in replies] == [552, 552]
        assert after.code == 250

    async def test_lmtp_on_a_unix_socket(self, gateway_factory, tmp_path):
        path = str(tmp_path / "lmtp.sock")
        gw = await gateway_factory(lmtp_socket=path)
        [reply] = await send_message(0, message(), lmtp=True, path=path)
        assert reply.text == "2.0.0 Ok: queued as SUP-1000"
        assert len(await gw.sink.wait_for(1)) == 1

    async def test_helo_and_ehlo_are_not_lmtp(self, gateway):
        client = await Client.connect(gateway.lmtp_port)
        await client.reply()
        reply = await client.cmd("EHLO client.test")
        await client.close()
        assert reply.code == 500


SMUGGLING = [
    pytest.param(b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@x.test>\r\n", id="bare-LF-dot-bare-LF"),
    pytest.param(b"Subject: a\r\n\r\nbody\r.\rMAIL FROM:<evil@x.test>\r\n", id="bare-CR-dot-bare-CR"),
    pytest.param(b"Subject: a\r\n\r\nbody\r\n.\nMAIL FROM:<evil@x.test>\r\n", id="CRLF-dot-LF"),
    pytest.param(b"Subject: a\r\n\r\nbody\n.\r\nMAIL FROM:<evil@x.test>\r\n", id="LF-dot-CRLF"),
    pytest.param(b"Subject: a\r\n\r\nNUL\x00byte\r\n", id="NUL"),
]


class TestHostileData:
    @pytest.mark.parametrize("content", SMUGGLING)
    async def test_smuggling_payloads_never_split_a_message_and_are_refused(self, gateway, content):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.cmd("RCPT TO:<support@example.test>")
        assert (await client.cmd("DATA")).code == 354
        await client.send(content + b".\r\n")
        reply = await client.reply()
        after = await client.cmd("NOOP")
        await client.close()
        assert reply.code == 550 and reply.text.startswith("5.6.0")
        assert after.code == 250
        assert await ticket_count(gateway.store) == 0

    async def test_a_header_that_begins_with_a_continuation_line_is_refused(self, gateway):
        # On top of a forward it would fold into gatewayd's own Subject.
        [reply] = await send_message(gateway.smtp_port, b" [SUP-9999] not a field\r\nSubject: x\r\n\r\nbody\r\n")
        assert reply.code == 550 and reply.text.startswith("5.6.0")
        assert await ticket_count(gateway.store) == 0

    async def test_normalize_mode_accepts_bare_newlines_as_crlf(self, gateway_factory):
        gw = await gateway_factory(limits="  bare_newlines: normalize\n")
        client = await Client.connect(gw.smtp_port)
        await client.greet()
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.cmd("RCPT TO:<support@example.test>")
        await client.cmd("DATA")
        await client.send(b"Subject: a\r\n\r\none\ntwo\rthree\r\n.\r\n")
        reply = await client.reply()
        await client.close()
        assert reply.code == 250
        [stored] = await gw.store.messages(1000)
        assert await gw.store.message_raw(stored.id) == b"Subject: a\r\n\r\none\r\ntwo\r\nthree\r\n"

    async def test_declared_size_above_the_limit_is_refused_at_mail(self, gateway_factory):
        gw = await gateway_factory(limits="  max_message_size: 10KB\n")
        client = await Client.connect(gw.smtp_port)
        ehlo = await client.greet()
        reply = await client.cmd("MAIL FROM:<carol@customer.test> SIZE=20000")
        await client.close()
        assert "SIZE 10240" in ehlo.lines
        assert reply.code == 552

    async def test_a_size_limit_of_zero_means_no_limit(self, gateway_factory):
        gw = await gateway_factory(limits="  max_message_size: 0\n")
        [reply] = await send_message(gw.smtp_port, message(body="x" * 500 + "\r\n") * 3)
        assert reply.code == 250

    async def test_oversize_data_is_refused_and_nothing_is_stored(self, gateway_factory):
        gw = await gateway_factory(limits="  max_message_size: 10KB\n")
        big = message(body="x" * 500 + "\r\n") * 30
        client = await Client.connect(gw.smtp_port)
        await client.greet()
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.cmd("RCPT TO:<support@example.test>")
        [reply] = await client.data(big)
        after = await client.cmd("NOOP")
        await client.close()
        assert reply.code == 552
        assert after.code == 250
        assert await ticket_count(gw.store) == 0

    async def test_a_line_over_998_characters_is_refused_and_the_session_stays_usable(self, gateway):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.cmd("RCPT TO:<support@example.test>")
        [refused] = await client.data(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n")
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.cmd("RCPT TO:<support@example.test>")
        [accepted] = await client.data(message(body="y" * 998 + "\r\n"))
        await client.close()
        assert refused.code == 500
        assert accepted.code == 250

    async def test_a_header_block_over_the_limit_gets_552(self, gateway_factory):
        gw = await gateway_factory(limits="  max_header_size: 2KB\n")
        headers = "".join(f"X-Filler-{i}: {'z' * 60}\r\n" for i in range(60))
        [reply] = await send_message(gw.smtp_port, message(extra=headers))
        assert reply.code == 552 and reply.text.startswith("5.3.4")

    async def test_a_forward_that_comes_back_twice_is_a_loop(self, gateway):
        looped = message(extra="X-Gatewayd-Ticket: SUP-1000\r\nX-Gatewayd-Ticket: SUP-1000\r\n")
        [reply] = await send_message(gateway.smtp_port, looped)
        assert reply.code == 554 and reply.text.startswith("5.4.6")


class TestFailures:
    async def test_an_unexpected_exception_answers_451_not_500(self, gateway, monkeypatch):
        async def explode(self, transaction):
            raise RuntimeError("secret internal detail")
        monkeypatch.setattr(Intake, "accept", explode)
        [reply] = await send_message(gateway.smtp_port, message())
        assert reply.code == 451 and reply.text.startswith("4.3.0")
        assert "secret" not in reply.text and "RuntimeError" not in reply.text

    async def test_a_full_store_answers_452(self, gateway, monkeypatch):
        async def full(self, work):
            raise StoreFull("database or disk is full")
        monkeypatch.setattr(Store, "transact", full)
        [reply] = await send_message(gateway.smtp_port, message())
        assert reply.code == 452 and reply.text.startswith("4.3.1")

    async def test_connections_beyond_the_limit_get_421(self, gateway_factory):
        gw = await gateway_factory(limits="  max_connections: 2\n")
        held = [await Client.connect(gw.smtp_port) for _ in range(2)]
        for client in held:
            assert (await client.reply()).code == 220
        extra = await Client.connect(gw.smtp_port)
        refused = await extra.reply()
        await extra.close()
        assert refused.code == 421 and refused.text.split()[0] == "4.7.0"
        await held[0].close()
        await asyncio.sleep(0.1)
        again = await Client.connect(gw.smtp_port)
        assert (await again.reply()).code == 220
        for client in (held[1], again):
            await client.close()

    async def test_an_idle_client_is_cut_with_421(self, gateway_factory):
        gw = await gateway_factory(limits="  idle_timeout: 0.3s\n")
        client = await Client.connect(gw.smtp_port)
        await client.greet()
        reply = await client.reply(timeout=5)
        await client.close()
        assert reply.code == 421 and reply.text.split()[0] == "4.4.2"

    async def test_a_client_that_hangs_up_mid_commit_leaves_a_whole_ticket(self, gateway):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.cmd("RCPT TO:<support@example.test>")
        await client.cmd("DATA")
        await client.send(message() + b".\r\n")
        client.writer.transport.abort()
        await asyncio.sleep(0.5)
        tickets = await ticket_count(gateway.store)
        messages = await gateway.store.fetchone("SELECT count(*) FROM messages")
        work = await gateway.store.fetchone("SELECT count(*) FROM work")
        assert (tickets, messages[0], work[0]) in {(0, 0, 0), (1, 1, 1)}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=gw.example.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class TestStarttls:
    async def test_starttls_is_offered_and_mail_is_accepted_over_tls(self, gateway_factory, certificate, tmp_path):
        cert, key = certificate
        gw = await gateway_factory(tls=(cert, key))
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.smtp_port)
        client = Client(reader, writer)
        ehlo = await client.greet()
        assert "STARTTLS" in ehlo.lines
        assert (await client.cmd("STARTTLS")).code == 220
        context = ssl.create_default_context(cafile=str(cert))
        await writer.start_tls(context, server_hostname="gw.example.test")
        after = await client.cmd("EHLO client.test")
        assert "STARTTLS" not in after.lines
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.cmd("RCPT TO:<support@example.test>")
        [reply] = await client.data(message())
        await client.close()
        assert reply.code == 250
        assert len(await gw.sink.wait_for(1)) == 1
