"""The metrics contract, scraped over HTTP from a running daemon after scripted mail."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from gatewayd.store import Tx, add_event
from tests.conftest import Gateway
from tests.ops.helpers import Scrape, scrape
from tests.support.gateway import REPO, free_port
from tests.support.smtp import message, send_message

# DESIGN.md § "Contract: metrics", with the names Prometheus sees.
CONTRACT = {
    "gatewayd_messages_received_total": {"listener", "outcome"},
    "gatewayd_tickets_created_total": {"team"},
    "gatewayd_tickets_open": {"team", "agent"},
    "gatewayd_tickets_overdue": {"team", "agent"},
    "gatewayd_first_response_seconds_bucket": {"team", "le"},
    "gatewayd_ack_seconds_bucket": {"team", "le"},
    "gatewayd_routing_decisions_total": {"plugin", "agent"},
    "gatewayd_autoreplies_total": {"result", "reason"},
    "gatewayd_outbox_messages": {"kind", "state"},
    "gatewayd_outbox_oldest_age_seconds": set(),
    "gatewayd_delivery_attempts_total": {"kind", "result"},
    "gatewayd_smtp_sessions_active": {"listener"},
    "gatewayd_plugin_errors_total": {"plugin"},
}

LOOP = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
               for i in range(51))


async def eventually(port: int, check: Callable[[Scrape], bool], timeout: float = 15) -> Scrape:
    """Scrapes until ``check`` holds (background work such as delivery is asynchronous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await scrape(port)
        if check(result):
            return result
        assert loop.time() < deadline, f"metrics never reached the expected state; last scrape: {result}"
        await asyncio.sleep(0.05)


async def mark(gw: Gateway, ticket: int, *kinds: str) -> None:
    """Writes SLA events the way the SLA clock does, through the store's event API."""
    async def write(tx: Tx) -> None:
        for kind in kinds:
            await add_event(tx, ticket, kind, {"target": "first_response"})
    await gw.store.transact(write)


def receipts_on() -> str:
    """Receipts with the shipped templates; DNS goes to an unused loopback port, never off the machine."""
    return (f'autoreply: {{templates: "{REPO / "etc" / "templates"}"}}\n'
            f"authentication: {{unauthenticated: accept}}\n"
            f'dns: {{resolver: "127.0.0.1:{free_port()}", timeout: 1s}}\n')


async def test_values_after_a_scripted_scenario_are_exact(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    gw: Gateway = await gateway_factory(metrics_port=port, extra=receipts_on())

    async def send(subject: str, n: int, extra: str = "", lmtp: bool = False) -> int:
        sender = f"c{n}@customer{n}.test"
        [reply] = await send_message(gw.lmtp_port if lmtp else gw.smtp_port,
                                     message(subject, sender=sender, message_id=f"<m{n}@customer.test>",
                                             extra=extra), mail_from=sender, lmtp=lmtp)
        return reply.code

    assert [await send(f"Question {n}", n) for n in range(3)] == [250] * 3
    assert await send("Question 0", 0) == 250, "an upstream retry: a duplicate"
    assert await send("Out of office", 3, "Auto-Submitted: auto-replied\r\n") == 250
    assert await send("Newsletter", 4, "Precedence: bulk\r\n") == 250
    assert await send("Bare", 5, "X-Bare: one\nLF\r\n") == 550
    assert await send("Loop", 6, LOOP) == 554
    assert await send("Via LMTP", 7, lmtp=True) == 250
    await eventually(port, lambda s: s.value("gatewayd_delivery_attempts_total", kind="forward", result="sent") == 6
                     and s.value("gatewayd_delivery_attempts_total", kind="receipt", result="sent") == 4)
    gw.sink.handler.answer = "550 5.7.1 Mailbox disabled"
    assert await send("Doomed", 8, "Auto-Submitted: auto-generated\r\n") == 250
    await mark(gw, 1000, "overdue")
    await mark(gw, 1001, "overdue", "replied")
    await mark(gw, 1002, "replied", "overdue")

    # The refused forward is re-offered to bob, then to the supervisor, whose alert is refused too.
    m = await eventually(port, lambda s: s.value("gatewayd_outbox_messages", kind="alert", state="failed") == 1
                         and s.total("gatewayd_autoreplies_total") == 7
                         and s.total("gatewayd_smtp_sessions_active") == 0)

    assert m.value("gatewayd_messages_received_total", listener="smtp", outcome="accepted") == 6
    assert m.value("gatewayd_messages_received_total", listener="smtp", outcome="duplicate") == 1
    assert m.value("gatewayd_messages_received_total", listener="smtp", outcome="refused") == 2
    assert m.value("gatewayd_messages_received_total", listener="smtp", outcome="tempfail") == 0
    assert m.value("gatewayd_messages_received_total", listener="lmtp", outcome="accepted") == 1
    assert m.value("gatewayd_smtp_transaction_seconds_count", listener="smtp") == 9
    assert m.value("gatewayd_smtp_transaction_seconds_count", listener="lmtp") == 1
    assert m.value("gatewayd_tickets_created_total", team="support") == 7
    assert m.value("gatewayd_tickets_created_total", team="security") == 0
    assert {l: v for l, v in m.series("gatewayd_routing_decisions_total").items() if v} == {
        frozenset({("plugin", "round_robin"), ("agent", "alice")}): 4,
        frozenset({("plugin", "round_robin"), ("agent", "bob")}): 4,
        frozenset({("plugin", "supervisor"), ("agent", "-")}): 1}
    assert m.value("gatewayd_tickets_open", team="support", agent="alice") == 3
    assert m.value("gatewayd_tickets_open", team="support", agent="bob") == 3
    assert m.value("gatewayd_tickets_open", team="support", agent="") == 1
    assert m.value("gatewayd_tickets_open", team="security", agent="sam") == 0
    assert m.value("gatewayd_tickets_overdue", team="support", agent="alice") == 2
    assert m.value("gatewayd_tickets_overdue", team="support", agent="bob") == 0
    assert m.value("gatewayd_tickets_overdue", team="security", agent="sam") == 0
    assert m.value("gatewayd_autoreplies_total", result="sent", reason="none") == 4
    assert m.value("gatewayd_autoreplies_total", result="suppressed", reason="auto_submitted") == 2
    assert m.value("gatewayd_autoreplies_total", result="suppressed", reason="precedence") == 1
    assert m.value("gatewayd_delivery_attempts_total", kind="forward", result="sent") == 6
    assert m.value("gatewayd_delivery_attempts_total", kind="forward", result="failed") == 3
    assert m.value("gatewayd_delivery_attempts_total", kind="alert", result="failed") == 1
    assert m.value("gatewayd_delivery_attempts_total", kind="forward", result="retry") == 0
    assert m.value("gatewayd_delivery_attempts_total", kind="receipt", result="sent") == 4
    assert m.value("gatewayd_delivery_attempts_total", kind="receipt", result="failed") == 0
    assert m.value("gatewayd_outbox_messages", kind="forward", state="failed") == 3
    assert m.total("gatewayd_outbox_messages", state="pending") == 0
    assert m.value("gatewayd_outbox_oldest_age_seconds") == 0
    assert m.total("gatewayd_plugin_errors_total") == 0
    assert m.value("gatewayd_smtp_sessions_active", listener="smtp") == 0


async def test_sessions_active_counts_open_connections(gateway_factory: Callable[..., Any]) -> None:
    from tests.support.smtp import Client

    port = free_port()
    gw: Gateway = await gateway_factory(metrics_port=port)
    clients = [await Client.connect(gw.smtp_port) for _ in range(3)]
    for client in clients:
        await client.greet()
    assert (await scrape(port)).value("gatewayd_smtp_sessions_active", listener="smtp") == 3
    for client in clients:
        await client.close()
    await eventually(port, lambda s: s.value("gatewayd_smtp_sessions_active", listener="smtp") == 0)


async def test_store_gauges_are_right_immediately_after_a_restart(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    first: Gateway = await gateway_factory(metrics_port=port)
    await first.sink.stop()
    for n in range(2):
        [reply] = await send_message(first.smtp_port, message(f"Relay down {n}", message_id=f"<r{n}@c.test>"))
        assert reply.code == 250
    await mark(first, 1000, "overdue")
    before = await eventually(
        port, lambda s: s.value("gatewayd_outbox_messages", kind="forward", state="pending") == 2)
    await first.daemon.shutdown()

    second_port = free_port()
    second: Gateway = await gateway_factory(metrics_port=second_port)
    after = await scrape(second_port)
    assert after.value("gatewayd_outbox_messages", kind="forward", state="pending") == 2
    assert after.total("gatewayd_tickets_open") == 2
    assert after.value("gatewayd_tickets_overdue", team="support", agent="alice") == 1
    assert after.value("gatewayd_outbox_oldest_age_seconds") >= before.value("gatewayd_outbox_oldest_age_seconds")
    assert after.total("gatewayd_messages_received_total") == 0, "counters start again from zero"
    await second.daemon.shutdown()


async def test_receipt_decisions_are_counted_with_a_bounded_reason(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    gw: Gateway = await gateway_factory(metrics_port=port)
    metrics = gw.daemon.metrics
    metrics.autoreply("sent")
    metrics.autoreply("suppressed", "auto_submitted")
    metrics.autoreply("suppressed", "auto_submitted")
    metrics.autoreply("suppressed", "Precedence: junk from evil@example")
    m = await scrape(port)
    assert m.value("gatewayd_autoreplies_total", result="sent", reason="none") == 1
    assert m.value("gatewayd_autoreplies_total", result="suppressed", reason="auto_submitted") == 2
    assert m.value("gatewayd_autoreplies_total", result="suppressed", reason="other") == 1
    assert m.value("gatewayd_autoreplies_total", result="suppressed", reason="rate_sender") == 0
    assert "evil" not in str(m.samples)


async def test_response_clocks_use_buckets_from_minutes_to_days(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    gw: Gateway = await gateway_factory(metrics_port=port)
    gw.daemon.metrics.acknowledged("support", 4 * 60)
    gw.daemon.metrics.first_response("support", 30 * 3600)
    m = await scrape(port)
    assert m.value("gatewayd_ack_seconds_bucket", team="support", le="300.0") == 1
    assert m.value("gatewayd_ack_seconds_bucket", team="support", le="60.0") == 0
    assert m.value("gatewayd_first_response_seconds_bucket", team="support", le="86400.0") == 0
    assert m.value("gatewayd_first_response_seconds_bucket", team="support", le="172800.0") == 1
    assert m.value("gatewayd_first_response_seconds_count", team="security") == 0
    bounds = {dict(l)["le"] for l in m.series("gatewayd_first_response_seconds_bucket")}
    assert {"60.0", "604800.0"} <= bounds


async def test_every_contract_metric_is_exported_with_help_and_its_labels(
        gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    await gateway_factory(metrics_port=port)
    m = await scrape(port)
    for name, labels in CONTRACT.items():
        series = m.series(name)
        assert series, f"{name} is not exported"
        assert all(set(dict(l)) == labels for l in series), (name, list(series)[:3])
    for family in m.families.values():
        if family.name.startswith("gatewayd_"):
            assert len(family.documentation) > 15, f"{family.name} has no useful HELP text"


async def test_label_values_never_come_from_message_content(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    gw: Gateway = await gateway_factory(metrics_port=port)
    marker = "zq9marker"
    content = message(f"{marker} subject", sender=f"{marker} <{marker}@customer.test>",
                      message_id=f"<{marker}@customer.test>",
                      extra=f"X-Customer-Tier: {marker}\r\nX-Gatewayd-Agent: {marker}\r\n", body=f"{marker}\r\n")
    [reply] = await send_message(gw.smtp_port, content, mail_from=f"{marker}@customer.test")
    assert reply.code == 250
    await gw.sink.wait_for(1)
    m = await scrape(port)
    assert marker not in repr(m.samples)
    allowed = {"smtp", "lmtp", "support", "security", "alice", "bob", "sam", "round_robin", "fallback", ""}
    for name, labels in m.samples:
        if name.startswith("gatewayd_") and name != "gatewayd_build_info":
            for key, value in labels:
                if key in ("listener", "team", "agent", "plugin"):
                    assert value in allowed, (name, key, value)
