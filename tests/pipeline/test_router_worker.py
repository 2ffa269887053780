"""The routing worker: one failing work item never holds up the queue behind it."""

from __future__ import annotations

import asyncio

from gatewayd import router as router_module
from gatewayd.router import Router
from tests.support.smtp import message, send_message


async def test_a_work_item_that_keeps_failing_is_set_aside_and_the_rest_flows(gateway, sink, monkeypatch):
    monkeypatch.setattr(router_module, "_RETRY_AFTER_ERROR", 0.05)
    original = Router.route

    async def poisoned(self, item):
        if item.ticket == 1000:
            raise RecursionError("maximum recursion depth exceeded")
        await original(self, item)
    monkeypatch.setattr(Router, "route", poisoned)

    await send_message(gateway.smtp_port, message("poison", message_id="<p@customer.test>"))
    await send_message(gateway.smtp_port, message("healthy", message_id="<h@customer.test>"))
    [forward] = await sink.wait_for(1)
    assert b"X-Gatewayd-Ticket: SUP-1001" in forward.content

    for _ in range(100):
        if any(e.kind == "work_failed" for e in await gateway.store.events(1000)):
            break
        await asyncio.sleep(0.05)
    [failed] = [e for e in await gateway.store.events(1000) if e.kind == "work_failed"]
    assert failed.detail["kind"] == "route" and "RecursionError" in failed.detail["error"]
    assert await gateway.store.pending_work() == []
