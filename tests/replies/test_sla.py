"""SLA clocks with a fake clock: re-offer on a missed ack, one overdue alert, business hours, reopen window."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

from gatewayd.sla import targets
from tests.replies.helpers import answer, header, kinds, open_ticket, work_done
from tests.support.smtp import message, send_message

BERLIN = ZoneInfo("Europe/Berlin")
HOURS = 'business_hours: {timezone: Europe/Berlin, hours: {mon-fri: "09:00-17:00"}, holidays: [2025-12-25]}\n'


def set_clock(gateway, clock) -> None:
    """The SLA scanner and the outbox share the fake clock, so what the scan enqueues is due at once."""
    gateway.daemon.sla.clock = clock
    gateway.daemon.outbox.clock = clock


async def run_cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gatewayd", *args,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


class TestAck:
    async def test_a_missed_ack_re_offers_the_ticket_to_another_agent_and_tells_the_first(self, gateway_factory):
        gateway = await gateway_factory(extra="sla: {ack: 10m, first_response: 24h}\n")
        number, forward = await open_ticket(gateway)
        first = header(forward, "X-Gatewayd-Agent")
        created = (await gateway.store.ticket(number)).created_at
        sla = gateway.daemon.sla
        set_clock(gateway, lambda: created + 9 * 60)
        assert await sla.scan() == (0, 0)
        set_clock(gateway, lambda: created + 11 * 60)
        assert await sla.scan() == (1, 0)
        assert await sla.scan() == (0, 0)
        received = await gateway.sink.wait_for(3)
        notice = next(r for r in received[1:] if r.rcpt_tos == [f"{first}@agents.example.test"])
        second = next(r for r in received[1:] if r is not notice)
        assert header(notice, "Auto-Submitted") == "auto-generated"
        assert header(second, "X-Gatewayd-Agent") not in (first, None)
        ticket = await gateway.store.ticket(number)
        assert ticket.agent not in (first, None)
        event = next(e for e in await gateway.store.events(number) if e.kind == "reoffered")
        assert event.detail == {"lapsed": first, "reason": "ack_missed"} and event.actor == "gatewayd"

    async def test_an_acked_ticket_is_not_re_offered(self, gateway_factory):
        gateway = await gateway_factory(extra="sla: {ack: 10m, first_response: 24h}\n")
        number, forward = await open_ticket(gateway)
        await answer(gateway, header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To"), "#ack\r\n")
        await work_done(gateway)
        created = (await gateway.store.ticket(number)).created_at
        set_clock(gateway, lambda: created + 3600)
        assert await gateway.daemon.sla.scan() == (0, 0)


class TestOverdue:
    async def test_one_alert_per_ticket_and_the_metric_and_cli_agree(self, gateway_factory):
        gateway = await gateway_factory(extra="sla: {ack: 1h, first_response: 2h}\n")
        number, forward = await open_ticket(gateway)
        agent = header(forward, "X-Gatewayd-Agent")
        await answer(gateway, agent, header(forward, "Reply-To"), "#ack\r\n")
        await work_done(gateway)
        created = (await gateway.store.ticket(number)).created_at
        sla = gateway.daemon.sla
        set_clock(gateway, lambda: created + 3 * 3600)
        assert await sla.scan() == (0, 1)
        assert await sla.scan() == (0, 0)
        [_, alert] = await gateway.sink.wait_for(2)
        await asyncio.sleep(0.3)
        assert len(gateway.sink.received) == 2
        assert alert.rcpt_tos == ["lead@example.test"]
        assert header(alert, "Auto-Submitted") == "auto-generated"
        text = alert.content.decode()
        assert f"SUP-{number}" in text and "carol@customer.test" in text and agent in text and "3h 00m" in text
        metrics = gateway.daemon.metrics
        await metrics.refresh(gateway.store, {})
        assert metrics.tickets_overdue.labels("support", agent)._value.get() == 1
        code, out = await run_cli("tickets", "list", "--overdue", "--json", "-c", str(gateway.config_path))
        assert code == 0 and [t["id"] for t in json.loads(out)] == [f"SUP-{number}"]

        await answer(gateway, agent, header(forward, "Reply-To"), "Sorry for the wait, fixed.\r\n")
        await gateway.sink.wait_for(3)
        await metrics.refresh(gateway.store, {})
        assert metrics.tickets_overdue.labels("support", agent)._value.get() == 0
        code, out = await run_cli("tickets", "list", "--overdue", "--json", "-c", str(gateway.config_path))
        assert json.loads(out) == []

    async def test_a_customer_follow_up_after_a_reply_restarts_the_response_clock(self, gateway_factory):
        gateway = await gateway_factory(extra="sla: {ack: 1h, first_response: 2h}\n")
        number, forward = await open_ticket(gateway)
        await answer(gateway, header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To"), "Restart it.\r\n")
        await gateway.sink.wait_for(2)
        [reply] = await send_message(gateway.smtp_port, message(f"Re: [SUP-{number}] Printer", message_id="<f1@c>"))
        assert reply.code == 250
        await work_done(gateway)
        followup = max(e.at for e in await gateway.store.events(number) if e.kind == "followup_received")
        sla = gateway.daemon.sla
        set_clock(gateway, lambda: followup + 3600)
        assert await sla.scan() == (0, 0)
        set_clock(gateway, lambda: followup + 2 * 3600 + 1)
        assert await sla.scan() == (0, 1)


class TestBusinessHours:
    async def test_targets_count_business_time_and_overrides_apply(self, gateway_factory):
        gateway = await gateway_factory(extra=HOURS + "sla:\n  ack: 15m\n  first_response: 8h\n"
                                        "  teams: {security: {first_response: 4h}}\n"
                                        "  priorities: {high: {ack: 5m, first_response: 2h}}\n")
        config = gateway.config
        friday = datetime(2025, 3, 7, 16, 0, tzinfo=BERLIN).timestamp()
        goal = targets(config, "support", "normal")
        assert (goal.ack, goal.first_response) == (900, 8 * 3600)
        monday_16 = datetime(2025, 3, 10, 16, 0, tzinfo=BERLIN).timestamp()
        assert goal.due(friday, goal.first_response) == monday_16
        assert targets(config, "security", "normal").first_response == 4 * 3600
        assert (targets(config, "security", "high").ack, targets(config, "security", "high").first_response) == \
            (300, 2 * 3600)

    async def test_the_clock_stands_still_over_the_weekend(self, gateway_factory):
        gateway = await gateway_factory(extra=HOURS + "sla: {ack: 1h, first_response: 2h}\n")
        number, forward = await open_ticket(gateway)
        await answer(gateway, header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To"), "#ack\r\n")
        await work_done(gateway)
        friday = datetime(2025, 3, 7, 16, 30, tzinfo=BERLIN).timestamp()
        await gateway.store.transact(lambda tx: tx.execute(
            "UPDATE tickets SET created_at = ? WHERE number = ?", (friday, number)))
        sla = gateway.daemon.sla
        for moment in (datetime(2025, 3, 8, 12, 0), datetime(2025, 3, 9, 23, 0), datetime(2025, 3, 10, 10, 29)):
            set_clock(gateway, lambda moment=moment: moment.replace(tzinfo=BERLIN).timestamp())
            assert await sla.scan() == (0, 0), moment
        set_clock(gateway, lambda: datetime(2025, 3, 10, 10, 31, tzinfo=BERLIN).timestamp())
        assert await sla.scan() == (0, 1)


class TestReopenWindow:
    async def test_a_reply_within_the_window_reopens_and_a_later_one_opens_a_linked_ticket(self, gateway_factory):
        gateway = await gateway_factory(extra="sla: {reopen_window: 2d}\n")
        number, forward = await open_ticket(gateway)
        reply_to = header(forward, "Reply-To")
        await answer(gateway, header(forward, "X-Gatewayd-Agent"), reply_to, "#close\r\n")
        await work_done(gateway)
        [reply] = await send_message(gateway.smtp_port, message(f"Re: [SUP-{number}] still broken",
                                                                message_id="<r1@customer.test>"))
        assert reply.text.endswith(f"SUP-{number}")
        assert (await gateway.store.ticket(number)).status == "open"
        reopened = next(e for e in await gateway.store.events(number) if e.kind == "reopened")
        assert reopened.actor == "carol@customer.test"

        await work_done(gateway)
        await answer(gateway, (await gateway.store.ticket(number)).agent, reply_to, "#close\r\n")
        await work_done(gateway)
        await gateway.store.transact(lambda tx: tx.execute(
            "UPDATE events SET at = at - 3 * 86400 WHERE ticket = ? AND kind = 'closed'", (number,)))
        [reply] = await send_message(gateway.smtp_port, message(f"Re: [SUP-{number}] again",
                                                                message_id="<r2@customer.test>"))
        assert not reply.text.endswith(f"SUP-{number}")
        new = int(reply.text.rsplit("-", 1)[1])
        assert (await gateway.store.ticket(number)).status == "closed"
        linked = next(e for e in await gateway.store.events(new) if e.kind == "linked")
        assert linked.detail == {"previous": f"SUP-{number}"}
        assert "continued_in" in await kinds(gateway, number)
