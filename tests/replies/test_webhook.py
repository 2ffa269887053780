"""The overdue webhook: a JSON POST through the outbox, retried until the receiver takes it."""

from __future__ import annotations

import asyncio
import json

import pytest

from gatewayd.webhook import Webhooks
from tests.replies.helpers import answer, header, open_ticket, work_done
from tests.replies.test_sla import set_clock
from tests.support.gateway import free_port


class Receiver:
    """A loopback HTTP endpoint that answers 503 to the first POST and 204 afterwards."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.statuses: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        body = await reader.readexactly(length)
        status = 503 if not self.statuses else 204
        self.statuses.append(status)
        if status == 204:
            self.bodies.append(json.loads(body))
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()


async def test_an_overdue_ticket_is_posted_to_the_webhook_and_retried_until_accepted(gateway_factory, monkeypatch):
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    receiver = Receiver()
    port = free_port()
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", port)
    try:
        gateway = await gateway_factory(
            extra=f'sla: {{ack: 1h, first_response: 2h, webhook: "http://127.0.0.1:{port}/hook"}}\n',
            retry="{first: 0.1s, max: 0.2s, give_up: 1h}")
        number, forward = await open_ticket(gateway)
        await answer(gateway, header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To"), "#ack\r\n")
        await work_done(gateway)
        created = (await gateway.store.ticket(number)).created_at
        fake_now = created + 3 * 3600
        set_clock(gateway, lambda: fake_now)
        assert await gateway.daemon.sla.scan() == (0, 1)
        for _ in range(200):
            if receiver.bodies:
                break
            await asyncio.sleep(0.02)
            fake_now += 1
        assert receiver.statuses[:2] == [503, 204]
        [posted] = receiver.bodies
        assert posted["ticket"] == f"SUP-{number}"
    finally:
        server.close()
        await server.wait_closed()


class Canned:
    """A loopback HTTP endpoint that answers every request with one fixed response."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.write(self.response)
        await writer.drain()
        writer.close()


@pytest.mark.parametrize("response, outcome, reply", [
    (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/elsewhere\r\nContent-Length: 0\r\n\r\n",
     "failed", "HTTP 302"),
    (b"HELLO, NOT HTTP\r\n\r\n", "retry", "BadStatusLine"),
], ids=["redirect", "not-http"])
async def test_a_redirect_or_a_garbled_answer_is_never_taken_for_delivery(monkeypatch, response, outcome, reply):
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    endpoint = Canned(response)
    port = free_port()
    server = await asyncio.start_server(endpoint.handle, "127.0.0.1", port)
    webhooks = Webhooks(concurrency=1, timeout=5.0)
    try:
        result = await webhooks.post(f"http://127.0.0.1:{port}/hook", b"{}")
    finally:
        webhooks.close()
        server.close()
    assert result.outcome == outcome and reply in result.reply
    assert endpoint.requests == 1, "no second request (a redirect is not followed)"
