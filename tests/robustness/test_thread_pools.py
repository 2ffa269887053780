"""Blocking work that waits on the network holds threads of its own, never those intake needs."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.gateway import free_port
from tests.support.relay import Script, ScriptedRelay
from tests.support.smtp import message, send_message

pytestmark = pytest.mark.slow


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
        big = message("large", message_id="<large@c.test>", body=("y" * 76 + "\r\n") * 4000)
        started = time.monotonic()
        [reply] = await send_message(gw.smtp_port, big)
        assert reply.code == 250 and time.monotonic() - started < 2.5
    finally:
        await relay.stop()
