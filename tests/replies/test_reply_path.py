"""Signed reply addresses and the agent reply path over real sockets."""

from __future__ import annotations

import re

from gatewayd.reply_address import reply_addresses
from tests.replies.helpers import answer, header, kinds, open_ticket, parse, wait_until, work_done
from tests.support.smtp import Client, message, send_message

AGENTS = {"alice", "bob", "sam"}


class TestReplyAddresses:
    def test_a_token_verifies_only_with_its_own_mac(self):
        replies = reply_addresses(("support@example.test",), "test-secret-123")
        address = replies.for_agent(1042, "alice")
        assert re.fullmatch(r"support\+1042\.a\.alice\.[0-9a-f]{20}@example\.test", address)
        token = replies.verify(address.upper())
        assert token is not None and (token.ticket, token.role, token.agent) == (1042, "agent", "alice")
        assert replies.verify(address.replace("1042", "1043")) is None
        assert replies.verify(address.replace(".alice.", ".bob.")) is None
        assert reply_addresses(("support@example.test",), "other-secret").verify(address) is None
        customer = replies.for_customer(7)
        assert replies.verify(customer).role == "customer"


class TestForward:
    async def test_the_forward_carries_the_agents_reply_address_and_keeps_the_original_reply_to(self, gateway):
        number, forward = await open_ticket(gateway, extra="Reply-To: Carol Home <carol@home.test>\r\n")
        agent = header(forward, "X-Gatewayd-Agent")
        reply_to = header(forward, "Reply-To")
        token = reply_addresses(gateway.config.support.addresses, "test-secret-123").verify(reply_to)
        assert token is not None and token.ticket == number and token.agent == agent
        assert header(forward, "X-Original-Reply-To") == "Carol Home <carol@home.test>"
        assert forward.content.count(b"\r\nReply-To:") + forward.content.startswith(b"Reply-To:") == 1


class TestRcpt:
    async def test_a_forged_or_unknown_plus_address_is_refused_at_rcpt(self, gateway):
        number, forward = await open_ticket(gateway)
        reply_to = header(forward, "Reply-To")
        forged = reply_to[:-len("@example.test") - 1] + ("0" if reply_to[-len("@example.test") - 1] != "0" else "1") \
            + "@example.test"
        client = await Client.connect(gateway.smtp_port)
        try:
            await client.greet()
            assert (await client.cmd("MAIL FROM:<alice@agents.example.test>")).code == 250
            assert (await client.cmd(f"RCPT TO:<{forged}>")).code == 550
            assert (await client.cmd(f"RCPT TO:<support+{number}.c@example.test>")).code == 550
            assert (await client.cmd(f"RCPT TO:<{reply_to}>")).code == 250
        finally:
            await client.close()


class TestRelay:
    async def test_the_agents_reply_reaches_the_customer_from_the_support_address(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        quoted = "".join(f"> {line}\r\n" for line in forward.content.decode().split("\r\n")[:8])
        await answer(gateway, agent, reply_to, f"Hello Carol,\r\nplease restart it.\r\n\r\n{quoted}",
                     subject=f"Re: [SUP-{number}] Printer on fire")
        [_, relayed] = await gateway.sink.wait_for(2)
        assert relayed.rcpt_tos == ["carol@customer.test"]
        assert relayed.mail_from == gateway.config.support.bounce_address
        mail = parse(relayed)
        assert str(mail["From"]) == f"{agent.title()} via Support <support@example.test>"
        assert f"[SUP-{number}]" in str(mail["Subject"])
        assert str(mail["In-Reply-To"]) == f"<c0@customer.test>"
        assert f"<SUP-{number}@gw.example.test>" in str(mail["References"])
        assert mail["Auto-Submitted"] is None
        assert str(mail["X-Gatewayd-Ticket"]) == f"SUP-{number}"
        customer_token = reply_addresses(gateway.config.support.addresses, "test-secret-123").verify(
            str(mail["Reply-To"]))
        assert customer_token is not None and customer_token.role == "customer"
        head, _, body = relayed.content.partition(b"\r\n\r\n")
        assert b"agents.example.test" not in relayed.content
        assert b"X-Gatewayd" not in body and b"support+" not in body
        assert "please restart it." in mail.get_content()
        events = await gateway.store.events(number)
        replied = next(e for e in events if e.kind == "replied")
        acked = next(e for e in events if e.kind == "acked")
        assert replied.actor == agent and acked.actor == agent and acked.detail["via"] == "reply"

    async def test_a_customer_reply_to_the_customer_address_threads_without_the_subject_tag(self, gateway):
        number, forward = await open_ticket(gateway)
        await answer(gateway, header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To"), "Try again.\r\n")
        [_, relayed] = await gateway.sink.wait_for(2)
        customer_address = header(relayed, "Reply-To")
        [reply] = await send_message(gateway.smtp_port, message("Re: Printer on fire", message_id="<c9@customer.test>"),
                                     rcpts=(customer_address,))
        assert reply.text.endswith(f"SUP-{number}")

    async def test_a_stranger_using_a_valid_reply_address_is_not_relayed_and_the_supervisor_is_told(self, gateway):
        number, forward = await open_ticket(gateway)
        reply_to = header(forward, "Reply-To")
        [reply] = await send_message(
            gateway.smtp_port, message("Re: hi", sender="Mallory <mallory@evil.test>", body="Pay here.\r\n"),
            mail_from="mallory@evil.test", rcpts=(reply_to,))
        assert reply.code == 250
        [_, alert] = await gateway.sink.wait_for(2)
        await work_done(gateway)
        assert alert.rcpt_tos == ["lead@example.test"]
        assert header(alert, "Auto-Submitted") == "auto-generated"
        assert all(r.rcpt_tos != ["carol@customer.test"] for r in gateway.sink.received)
        refused = [e for e in await gateway.store.events(number) if e.kind == "reply_refused"]
        assert refused[0].detail["reason"] == "not_agent" and refused[0].actor == "mallory@evil.test"
        metric = gateway.daemon.metrics.replies_refused.labels("not_agent")._value.get()
        assert metric == 1


class TestCommands:
    async def test_commands_are_applied_and_stripped_and_a_note_never_reaches_the_customer(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        await answer(gateway, agent, reply_to,
                     "#ack\r\n#note customer is on the old firmware\r\n#priority high\r\n\r\nDear Carol,\r\n"
                     "a fix is coming.\r\n#close is what I will do later\r\n")
        [_, relayed] = await gateway.sink.wait_for(2)
        body = parse(relayed).get_content()
        assert "Dear Carol" in body and "#close is what I will do later" in body
        assert "#ack" not in body and "firmware" not in body and "#priority" not in body
        ticket = await gateway.store.ticket(number)
        assert ticket.priority == "high" and ticket.status == "open"
        events = {e.kind: e for e in await gateway.store.events(number)}
        assert events["note"].detail["text"] == "customer is on the old firmware"
        assert events["acked"].detail["via"] == "command" and events["note"].actor == agent

    async def test_a_commands_only_reply_relays_nothing(self, gateway):
        number, forward = await open_ticket(gateway)
        await answer(gateway, header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To"),
                     "#note internal only\r\n#close\r\n")
        await work_done(gateway)
        assert len(gateway.sink.received) == 1
        assert (await gateway.store.ticket(number)).status == "closed"
        assert "replied" not in await kinds(gateway, number)


class TestOutOfOffice:
    async def test_an_out_of_office_answer_marks_the_agent_away_and_re_offers_the_ticket(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        await answer(gateway, agent, reply_to, "I am away until Monday.\r\n",
                     subject="Automatic reply: Printer on fire", extra="Auto-Submitted: auto-replied\r\n")
        [_, second] = await gateway.sink.wait_for(2)
        assert header(second, "X-Gatewayd-Agent") not in (agent, None)
        assert second.rcpt_tos != ["carol@customer.test"]
        states = await gateway.store.agent_states()
        assert states[agent].away
        reoffered = next(e for e in await gateway.store.events(number) if e.kind == "reoffered")
        assert reoffered.detail == {"lapsed": agent, "reason": "out_of_office"}
        assert (await gateway.store.ticket(number)).agent != agent
