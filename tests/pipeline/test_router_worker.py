"""The routing worker: one failing work item never holds up the queue behind it."""

from __future__ import annotations

import asyncio

from gatewayd import router as router_module
from gatewayd.router import Router
from tests.support.smtp import message, send_message


async def test_a_work_item_that_keeps_failing_is_set_aside_and_the_rest_flows(gateway, sink, monkeypatch):
    monkeypatch.setattr(router_module, "_RETRY_AFTER_ERROR", 0.05)
    original = Router.plan_route

    async def poisoned(self, item, view):
        if item.ticket == 1000:
            raise RecursionError("maximum recursion depth exceeded")
        return await original(self, item, view)
    monkeypatch.setattr(Router, "plan_route", poisoned)

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


async def test_a_reload_keeps_restart_only_sections_for_every_part(gateway):
    """Intake and the reply path must agree on the secret until a restart, or replies are lost."""
    text = gateway.config_path.read_text()
    gateway.config_path.write_text(text.replace("test-secret-123", "another-secret-456")
                                   .replace("{name: bob,", "{name: bobby,"))
    assert gateway.daemon.reload()
    config = gateway.daemon.config
    assert config.support.reply_secret == "test-secret-123"
    assert [a.name for a in config.agents] == ["alice", "bobby", "sam"]
    assert gateway.daemon._intake.config is config
