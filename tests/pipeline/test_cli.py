"""The tickets and queue commands, as an admin runs them against a live store."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.support.smtp import message, send_message


async def gatewayd(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_tickets_list_shows_each_ticket_with_owner(gateway):
    await send_message(gateway.smtp_port, message("Printer on fire"))
    await send_message(gateway.smtp_port, message("Lost password", message_id="<m2@customer.test>"))
    await gateway.sink.wait_for(2)
    code, out, err = await gatewayd("tickets", "list", "--open", "--json", "-c", str(gateway.config_path))
    assert code == 0, err
    listed = {t["id"]: t for t in json.loads(out)}
    assert set(listed) == {"SUP-1000", "SUP-1001"}
    assert listed["SUP-1000"]["subject"] == "Printer on fire"
    assert {listed["SUP-1000"]["agent"], listed["SUP-1001"]["agent"]} == {"alice", "bob"}

    code, out, _ = await gatewayd("tickets", "list", "-c", str(gateway.config_path))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["ID", "STATUS", "PRIORITY", "TEAM", "AGENT"]
    assert [r.split()[0] for r in rows] == ["SUP-1001", "SUP-1000"]


async def test_tickets_show_lists_messages_and_the_audit_trail_with_the_routing_trace(gateway):
    await send_message(gateway.smtp_port, message("Printer on fire"))
    await gateway.sink.wait_for(1)
    await asyncio.sleep(0.2)
    code, out, err = await gatewayd("tickets", "show", "SUP-1000", "--json", "-c", str(gateway.config_path))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["ticket"]["id"] == "SUP-1000"
    assert [m["message_id"] for m in shown["messages"]] == ["<m1@customer.test>"]
    kinds = [e["kind"] for e in shown["events"]]
    assert kinds == ["message_received", "routed", "delivered"]
    routed = shown["events"][1]["detail"]
    assert routed["agent"] == "alice"
    assert [step["plugin"] for step in routed["trace"]] == ["round_robin"]

    code, out, _ = await gatewayd("tickets", "show", "sup-1000", "-c", str(gateway.config_path))
    assert code == 0 and "round_robin" in out and "delivered" in out


async def test_an_unknown_ticket_is_a_clear_error(gateway):
    code, out, err = await gatewayd("tickets", "show", "SUP-9999", "-c", str(gateway.config_path))
    assert code == 1 and "no ticket SUP-9999" in err and "Traceback" not in err
