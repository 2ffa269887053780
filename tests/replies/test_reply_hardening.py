"""Reviewer fixes on the agent reply path: agent identity, hostile MIME, #assign <team>."""

from __future__ import annotations

import uuid

from gatewayd import agent_mail as agent_mail_module
from gatewayd.agent_commands import parse as parse_commands
from gatewayd.agent_reply import AgentReplies
from tests.replies.helpers import (
    agent_mail,
    answer,
    header,
    kinds,
    open_ticket,
    parse,
    work_done,
)
from tests.support.smtp import send_message


async def refused(gateway, number: int) -> list:
    return [e for e in await gateway.store.events(number) if e.kind == "reply_refused"]


def customer_copies(gateway) -> list:
    return [r for r in gateway.sink.received if r.rcpt_tos == ["carol@customer.test"]]


class TestAgentIdentity:
    def test_a_from_with_a_second_address_has_no_agent_identity(self):
        raw = (b"From: alice@agents.example.test, x@evil.test\r\nSubject: hi\r\n\r\nPay here.\r\n")
        assert agent_mail_module.read(raw).from_address is None
        assert agent_mail_module.read(b"From: Alice <Alice@Agents.Example.Test>\r\n\r\nhi\r\n").from_address \
            == "alice@agents.example.test"

    async def test_a_from_header_smuggling_a_second_address_is_refused(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        raw = agent_mail(agent, reply_to, "Pay here.\r\n").replace(
            f"From: {agent.title()} <{agent}@agents.example.test>".encode(),
            f"From: {agent}@agents.example.test, x@evil.test".encode())
        [reply] = await send_message(gateway.smtp_port, raw, mail_from=f"{agent}@agents.example.test",
                                     rcpts=(reply_to,))
        assert reply.code == 250
        await work_done(gateway)
        assert not customer_copies(gateway)
        assert [e.detail["reason"] for e in await refused(gateway, number)] == ["not_agent"]

    async def test_the_agents_from_with_a_foreign_envelope_sender_is_refused(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        [reply] = await send_message(gateway.smtp_port, agent_mail(agent, reply_to, "Pay here.\r\n"),
                                     mail_from="mallory@evil.test", rcpts=(reply_to,))
        assert reply.code == 250
        await work_done(gateway)
        assert not customer_copies(gateway)
        assert [e.detail["reason"] for e in await refused(gateway, number)] == ["not_agent"]
        assert "replied" not in await kinds(gateway, number)

    async def test_the_agents_envelope_with_a_foreign_from_is_refused(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        raw = agent_mail(agent, reply_to, "Pay here.\r\n").replace(
            f"{agent}@agents.example.test>".encode(), b"mallory@evil.test>", 1)
        [reply] = await send_message(gateway.smtp_port, raw, mail_from=f"{agent}@agents.example.test",
                                     rcpts=(reply_to,))
        assert reply.code == 250
        await work_done(gateway)
        assert not customer_copies(gateway)
        assert [e.detail["reason"] for e in await refused(gateway, number)] == ["not_agent"]


def deep_mime(agent: str, reply_to: str, depth: int = 1200) -> bytes:
    head = (f"From: {agent.title()} <{agent}@agents.example.test>\r\nTo: {reply_to}\r\nSubject: Re: hi\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@agents.example.test>\r\nMIME-Version: 1.0\r\n").encode()
    body = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    return head + body + b"Content-Type: text/plain\r\n\r\nhello\r\n"


def crlf_filename(agent: str, reply_to: str) -> bytes:
    return (f"From: {agent.title()} <{agent}@agents.example.test>\r\nTo: {reply_to}\r\nSubject: Re: hi\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@agents.example.test>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
            "--XX\r\nContent-Type: text/plain\r\n\r\nThe log is attached.\r\n"
            "--XX\r\nContent-Type: application/octet-stream\r\n"
            'Content-Disposition: attachment; filename="=?utf-8?q?log=0D=0ABcc=3A_x=40evil.test?="\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--XX--\r\n").encode()


class TestHostileMime:
    def test_read_never_raises(self):
        deep = agent_mail_module.read(deep_mime("alice", "support+1.a.alice.x@example.test"))
        assert deep.unreadable and deep.from_address == "alice@agents.example.test" and not deep.attachments
        mail = agent_mail_module.read(crlf_filename("alice", "support+1.a.alice.x@example.test"))
        assert [a.filename for a in mail.attachments] == ["logBcc: x@evil.test"]

    async def test_1200_deep_mime_from_the_agent_is_refused_with_an_event(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        [reply] = await send_message(gateway.smtp_port, deep_mime(agent, reply_to),
                                     mail_from=f"{agent}@agents.example.test", rcpts=(reply_to,))
        assert reply.code == 250
        await work_done(gateway)
        assert not customer_copies(gateway)
        assert [e.detail["reason"] for e in await refused(gateway, number)] == ["unreadable"]
        assert gateway.daemon.metrics.replies_refused.labels("unreadable")._value.get() == 1

    async def test_an_encoded_crlf_in_an_attachment_filename_is_relayed_on_one_line(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        [reply] = await send_message(gateway.smtp_port, crlf_filename(agent, reply_to),
                                     mail_from=f"{agent}@agents.example.test", rcpts=(reply_to,))
        assert reply.code == 250
        [relayed] = [r for r in await gateway.sink.wait_for(2) if r.rcpt_tos == ["carol@customer.test"]]
        mail = parse(relayed)
        assert "Bcc" not in mail and mail["Bcc"] is None
        [attachment] = list(mail.iter_attachments())
        assert attachment.get_filename() == "logBcc: x@evil.test"
        assert attachment.get_content() == b"hello"
        assert "replied" in await kinds(gateway, number)


class TestAssignTeam:
    async def test_assign_to_a_team_routes_afresh_without_a_lapse(self, gateway):
        number, forward = await open_ticket(gateway)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        assert agent in ("alice", "bob")
        await answer(gateway, agent, reply_to, "#assign security\r\n")
        [_, second] = await gateway.sink.wait_for(2)
        await work_done(gateway)
        assert second.rcpt_tos == ["sam@agents.example.test"]
        assert b"Printer on fire" in second.content and b"#assign" not in second.content
        ticket = await gateway.store.ticket(number)
        assert (ticket.agent, ticket.team) == ("sam", "security")
        events = await gateway.store.events(number)
        assert "reoffered" not in [e.kind for e in events]
        assigned = next(e for e in events if e.kind == "assigned")
        assert assigned.detail["team"] == "security" and assigned.actor == agent

    async def test_assign_on_an_unowned_ticket_routes_it(self, gateway):
        number, forward = await open_ticket(gateway)
        agent = header(forward, "X-Gatewayd-Agent")
        await gateway.store.transact(lambda tx: tx.execute("UPDATE tickets SET agent = NULL WHERE number = ?",
                                                           (number,)))
        config, router = gateway.daemon.config, gateway.daemon.router
        replies = AgentReplies(lambda: config, gateway.store, router.ids, gateway.daemon.metrics)
        ticket = await gateway.store.ticket(number)
        [command] = parse_commands("#assign security\n").commands
        assert await gateway.store.transact(
            lambda tx: replies._apply(tx, config, ticket, agent, command, ticket.created_at + 1))
        router.wake()
        [_, second] = await gateway.sink.wait_for(2)
        assert second.rcpt_tos == ["sam@agents.example.test"]
        await work_done(gateway)
        ticket = await gateway.store.ticket(number)
        assert (ticket.agent, ticket.team) == ("sam", "security")
        assert "reoffered" not in await kinds(gateway, number)
