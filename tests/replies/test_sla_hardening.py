"""Reviewer fixes on the SLA clock: the re-offer re-checks #ack inside its transaction; one bad ticket is skipped."""

from __future__ import annotations

from gatewayd.reoffer import reoffer
from tests.replies.helpers import answer, header, kinds, open_ticket, work_done
from tests.support.smtp import message, send_message


class TestReofferRace:
    async def test_a_reoffer_decided_before_an_ack_does_nothing_once_the_ack_is_committed(self, gateway_factory):
        gateway = await gateway_factory(extra="sla: {ack: 10m, first_response: 24h}\n")
        number, forward = await open_ticket(gateway)
        agent = header(forward, "X-Gatewayd-Agent")
        ticket = await gateway.store.ticket(number)
        # The scan read the ticket (not acked) and is about to re-offer; the agent's #ack commits first.
        await answer(gateway, agent, header(forward, "Reply-To"), "#ack\r\n")
        await work_done(gateway)
        now = ticket.created_at + 3600
        assert not await gateway.store.transact(lambda tx: reoffer(tx, number, agent, "ack_missed", now))
        gateway.daemon.sla.clock = lambda: now
        assert await gateway.daemon.sla._reoffer(gateway.config, ticket, agent, now) == 0
        assert "reoffered" not in await kinds(gateway, number)
        assert (await gateway.store.ticket(number)).agent == agent

    async def test_without_an_ack_the_reoffer_still_happens(self, gateway_factory):
        gateway = await gateway_factory(extra="sla: {ack: 10m, first_response: 24h}\n")
        number, forward = await open_ticket(gateway)
        agent = header(forward, "X-Gatewayd-Agent")
        now = (await gateway.store.ticket(number)).created_at + 3600
        assert await gateway.store.transact(lambda tx: reoffer(tx, number, agent, "ack_missed", now))


class TestScanIsolation:
    async def test_one_bad_ticket_does_not_stop_the_others(self, gateway_factory, caplog):
        gateway = await gateway_factory(extra="sla: {ack: 10m, first_response: 1h}\n")
        first, _ = await open_ticket(gateway)
        [reply] = await send_message(gateway.smtp_port, message("Second", message_id="<c-second@customer.test>"))
        assert reply.code == 250
        await work_done(gateway)
        second = first + 1
        # A corrupt audit-trail row makes ticket `first` unreadable for the clock.
        await gateway.store.transact(lambda tx: tx.execute(
            "INSERT INTO events (ticket, at, kind, actor, detail) VALUES (?, 0, 'note', 'x', 'not json')", (first,)))
        created = (await gateway.store.ticket(second)).created_at
        gateway.daemon.sla.clock = lambda: created + 2 * 3600
        gateway.daemon.outbox.clock = gateway.daemon.sla.clock
        reoffered, overdue = await gateway.daemon.sla.scan()
        assert overdue == 1 and reoffered == 1
        assert "overdue" in await kinds(gateway, second)
        assert any(f"SUP-{first}" in r.getMessage() for r in caplog.records if r.name == "gatewayd.sla")
