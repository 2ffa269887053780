"""Blocking work that waits on the network holds threads of its own, never those intake needs."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.gateway import free_port
from tests.support.relay import Script, ScriptedRelay
from tests.support.smtp import message, send_message

pytestmark = pytest.mark.slow


async def assert_a_large_message_is_accepted_in_time(gw) -> None:
    """300 KB, checked in a worker thread of the default pool: its 250 must not wait for the stuck work."""
    big = message("large", message_id="<large@c.test>", body=("y" * 76 + "\r\n") * 4000)
    started = time.monotonic()
    [reply] = await send_message(gw.smtp_port, big)
    assert reply.code == 250 and time.monotonic() - started < 2.5


async def test_a_hung_relay_does_not_hold_up_intake_of_large_messages(gateway_factory):
    """Eight relay sessions stuck for seconds each; a 300 KB message (checked in a worker thread) still gets its 250."""
    relay = ScriptedRelay(free_port(), Script(delay=3.0))
    await relay.start()
    try:
        gw = await gateway_factory(relay_port=relay.port, relay_concurrency=8, relay_timeout="30s")
        for n in range(8):
            [reply] = await send_message(gw.smtp_port, message(f"stuck {n}", message_id=f"<stuck{n}@c.test>"))
            assert reply.code == 250
        deadline = time.monotonic() + 10
        while relay.sessions < 8:
            assert time.monotonic() < deadline, f"only {relay.sessions} relay sessions opened"
            await asyncio.sleep(0.05)
        await assert_a_large_message_is_accepted_in_time(gw)
    finally:
        await relay.stop()


async def test_a_hung_webhook_endpoint_does_not_hold_up_intake_of_large_messages(gateway_factory, monkeypatch):
    """Eight overdue posts to an endpoint that never answers; a 300 KB message still gets its 250."""
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    posts: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        posts.append(writer)
        await reader.read(65536)

    port = free_port()
    endpoint = await asyncio.start_server(never_answer, "127.0.0.1", port)
    try:
        gw = await gateway_factory(relay_concurrency=8, relay_timeout="30s",
                                   extra=f'sla: {{ack: 1h, first_response: 2h, webhook: "http://127.0.0.1:{port}/"}}\n')
        for n in range(8):
            [reply] = await send_message(gw.smtp_port, message(f"late {n}", message_id=f"<late{n}@c.test>"))
            assert reply.code == 250
        await gw.sink.wait_for(8)
        newest = max(t.created_at for t in await gw.store.tickets())
        gw.daemon.sla.clock = gw.daemon.outbox.clock = lambda: newest + 3 * 3600
        assert (await gw.daemon.sla.scan())[1] == 8
        deadline = time.monotonic() + 10
        while len(posts) < 8:
            assert time.monotonic() < deadline, f"only {len(posts)} webhook posts started"
            await asyncio.sleep(0.05)
        await assert_a_large_message_is_accepted_in_time(gw)
    finally:
        for writer in posts:
            writer.transport.abort()
        endpoint.close()
