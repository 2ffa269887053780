"""Shared steps of the reply-path specs: open a ticket, find its forward, answer as the agent."""

from __future__ import annotations

import asyncio
import email
import re
import uuid
from email import policy
from email.message import EmailMessage

from tests.support.smtp import Received, message, send_message


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def parse(received: Received) -> EmailMessage:
    return email.message_from_bytes(received.content, policy=policy.default)  # type: ignore[return-value]


def header(received: Received, name: str) -> str | None:
    value = parse(received).get(name)
    return str(value) if value is not None else None


async def open_ticket(gateway, subject: str = "Printer on fire", extra: str = "") -> tuple[int, Received]:
    """Sends a customer message and returns the ticket number and the forward the agent got."""
    before = len(gateway.sink.received)
    [reply] = await send_message(gateway.smtp_port, message(subject, extra=extra,
                                                            message_id=f"<c{before}@customer.test>"))
    assert reply.code == 250, reply
    number = int(re.search(r"-(\d+)", reply.text).group(1))
    received = await gateway.sink.wait_for(before + 1)
    return number, received[before]


def agent_mail(agent: str, reply_to: str, body: str, *, subject: str = "Re: [SUP-1000] Printer on fire",
               extra: str = "") -> bytes:
    return (f"From: {agent.title()} <{agent}@agents.example.test>\r\nTo: {reply_to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@agents.example.test>\r\n{extra}\r\n{body}").encode()


async def answer(gateway, agent: str, reply_to: str, body: str, **kwargs) -> None:
    [reply] = await send_message(gateway.smtp_port, agent_mail(agent, reply_to, body, **kwargs),
                                 mail_from=f"{agent}@agents.example.test", rcpts=(reply_to,))
    assert reply.code == 250, reply


async def work_done(gateway) -> None:
    async def idle() -> bool:
        return not await gateway.store.pending_work(limit=1)
    await wait_until(idle)


async def kinds(gateway, number: int) -> list[str]:
    return [e.kind for e in await gateway.store.events(number)]
