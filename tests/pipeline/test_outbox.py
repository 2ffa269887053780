"""The outbox: forwards survive a relay outage, a refusal and a restart, and stay visible."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator

from gatewayd.outbox import Outbox
from gatewayd.store import Store
from tests.support.smtp import message, send_message


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def routed_with_the_outbox_stopped(gateway, count: int, label: str) -> None:
    """``count`` messages accepted and routed, their forwards waiting in the outbox for a test's own worker."""
    await gateway.daemon.outbox.stop(0)
    for n in range(count):
        await send_message(gateway.smtp_port, message(f"{label} {n}", message_id=f"<{label}{n}@customer.test>"))

    async def routed() -> bool:
        return not await gateway.store.pending_work(limit=1)
    await wait_until(routed)


async def forward_item(store: Store):
    items = await store.outbox(states=("pending", "failed", "sent"))
    return next((i for i in items if i.kind == "forward"), None)


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


class TestRelayOutage:
    async def test_mail_accepted_while_the_relay_is_down_is_delivered_when_it_returns(self, gateway, sink):
        await sink.stop()
        [reply] = await send_message(gateway.smtp_port, message())
        assert reply.code == 250

        async def retried() -> bool:
            item = await forward_item(gateway.store)
            return item is not None and item.attempts >= 2
        await wait_until(retried)
        item = await forward_item(gateway.store)
        assert item.state == "pending" and item.last_error
        assert item.next_attempt_at > item.created_at

        await sink.start()
        [forward] = await sink.wait_for(1, timeout=15)
        assert f"Message-ID: {item.message_id}\r\n".encode() in forward.content
        await wait_until(lambda: _state_is(gateway.store, "sent"))
        kinds = [e.kind for e in await gateway.store.events(1000)]
        assert kinds.count("delivery_deferred") >= 2 and kinds[-1] == "delivered"

    async def test_a_temporary_refusal_is_retried_with_the_same_message_id(self, gateway, sink):
        sink.handler.answer = "451 4.3.0 try again later"
        await send_message(gateway.smtp_port, message())

        async def deferred() -> bool:
            item = await forward_item(gateway.store)
            return item is not None and item.attempts >= 1
        await wait_until(deferred)
        first = await forward_item(gateway.store)
        assert first.last_error.startswith("451")
        sink.handler.answer = None
        [forward] = await sink.wait_for(1, timeout=15)
        assert f"Message-ID: {first.message_id}\r\n".encode() in forward.content


async def _state_is(store: Store, state: str) -> bool:
    item = await forward_item(store)
    return item is not None and item.state == state


class TestPermanentFailure:
    async def test_a_5xx_marks_the_item_failed_with_the_reply_and_keeps_it_visible(self, gateway, sink):
        sink.handler.answer = "550 5.1.1 mailbox unavailable"
        await send_message(gateway.smtp_port, message())
        await wait_until(lambda: _state_is(gateway.store, "failed"))
        item = await forward_item(gateway.store)
        assert item.attempts == 1
        assert item.last_error == "550 5.1.1 mailbox unavailable"
        failed = [e for e in await gateway.store.events(1000) if e.kind == "delivery_failed"]
        assert failed and failed[0].detail["reply"] == "550 5.1.1 mailbox unavailable"

        code, out, err = await run_cli("queue", "list", "--json", "-c", str(gateway.config_path))
        assert code == 0, err
        [listed] = json.loads(out)
        assert listed["state"] == "failed" and listed["last_error"] == "550 5.1.1 mailbox unavailable"

    async def test_retries_give_up_after_the_configured_time(self, gateway_factory, sink):
        gw = await gateway_factory(retry="{first: 0.1s, max: 0.1s, give_up: 0.5s}")
        sink.handler.answer = "421 4.7.0 busy"
        await send_message(gw.smtp_port, message())
        await wait_until(lambda: _state_is(gw.store, "failed"))
        item = await forward_item(gw.store)
        assert item.attempts >= 2 and item.last_error.startswith("421")


class TestRestart:
    async def test_pending_forwards_resume_after_a_restart(self, gateway_factory, sink):
        await sink.stop()
        first = await gateway_factory()
        [reply] = await send_message(first.smtp_port, message())
        assert reply.code == 250
        await wait_until(lambda: _attempted(first.store))
        pending = await forward_item(first.store)
        await first.daemon.shutdown()

        await sink.start()
        second = await gateway_factory(smtp_port=first.smtp_port, lmtp_port=first.lmtp_port)
        [forward] = await sink.wait_for(1, timeout=15)
        assert f"Message-ID: {pending.message_id}\r\n".encode() in forward.content
        await wait_until(lambda: _state_is(second.store, "sent"))

    async def test_routing_work_committed_before_a_restart_is_routed_after_it(self, gateway_factory, sink):
        from gatewayd.router import Router

        first = await gateway_factory()
        first.daemon.router.stop()
        await asyncio.sleep(0.1)
        await send_message(first.smtp_port, message())
        assert len(await first.store.pending_work()) == 1
        await first.daemon.shutdown()

        second = await gateway_factory(smtp_port=first.smtp_port, lmtp_port=first.lmtp_port)
        assert isinstance(second.daemon.router, Router)
        assert len(await sink.wait_for(1)) == 1
        assert await second.store.pending_work() == []


async def _attempted(store: Store) -> bool:
    item = await forward_item(store)
    return item is not None and item.attempts >= 1


class TestNeverSilentlyDropped:
    async def test_a_forward_refused_permanently_goes_to_another_agent(self, gateway, sink):
        sink.handler.answer = "550 5.1.1 mailbox unavailable"
        await send_message(gateway.smtp_port, message())
        await wait_until(lambda: _state_is(gateway.store, "failed"))
        sink.handler.answer = None
        [forward] = await sink.wait_for(1, timeout=15)
        assert forward.rcpt_tos == ["bob@agents.example.test"]
        ticket = await gateway.store.ticket(1000)
        assert ticket.agent == "bob"
        reoffered = [e for e in await gateway.store.events(1000) if e.kind == "reoffered"]
        assert reoffered[0].detail == {"lapsed": "alice", "reason": "delivery_failed"}

    async def test_when_nobody_else_can_take_it_the_supervisor_is_told(self, gateway, sink):
        await gateway.store.set_agent_away("bob", True, "test")
        refused = "550 5.1.1 mailbox unavailable"
        sink.handler.refuse = {"alice@agents.example.test": refused, "lead@example.test": refused}
        await send_message(gateway.smtp_port, message())

        async def supervisor_told() -> bool:
            return any(e.kind == "failure_reported" for e in await gateway.store.events(1000))
        await wait_until(supervisor_told, timeout=15)
        [alert] = await sink.wait_for(1, timeout=15)
        assert alert.rcpt_tos == ["lead@example.test"]
        assert b"Auto-Submitted: auto-generated" in alert.content
        assert b"Undeliverable forward" in alert.content

    async def test_an_attempt_that_cannot_be_recorded_is_not_resent_in_a_tight_loop(self, gateway, sink, monkeypatch):
        """A message the relay took while the store was full is recorded later, never sent again."""
        from gatewayd.errors import StoreFull
        record = Outbox._record

        def store_full(self, item, result, now):
            async def write(tx):
                raise StoreFull("database or disk is full")
            return write
        monkeypatch.setattr(Outbox, "_record", store_full)
        await send_message(gateway.smtp_port, message())
        await sink.wait_for(1)
        await asyncio.sleep(1.0)
        assert len(sink.received) <= 8, "retried at most once per retry.first (0.2s), not in a loop"
        assert len(sink.received) == 1, "the relay already has it: only the record is retried"

        monkeypatch.setattr(Outbox, "_record", record)
        await wait_until(lambda: _state_is(gateway.store, "sent"))
        await asyncio.sleep(0.5)
        assert len(sink.received) == 1


@contextlib.asynccontextmanager
async def outbox_of_its_own(gateway, commits_held: bool = False, monkeypatch=None) -> AsyncIterator[asyncio.Event]:
    """A test's own outbox worker for the duration of the block.

    With ``commits_held`` every store commit waits until the block sets the
    yielded event (or ends): deliveries go on while their results wait.
    """
    release = asyncio.Event()
    if commits_held:
        transact_each = gateway.store.transact_each

        async def held(parts):
            await release.wait()
            return await transact_each(parts)
        monkeypatch.setattr(gateway.store, "transact_each", held)
    else:
        release.set()
    outbox = Outbox(gateway.daemon.config, gateway.store, gateway.daemon.metrics)
    task = asyncio.create_task(outbox.run())
    try:
        yield release
    finally:
        release.set()
        await outbox.stop(5)
        task.cancel()


class TestBookkeeping:
    async def test_a_burst_of_results_is_recorded_in_a_few_transactions(self, gateway, sink):
        await routed_with_the_outbox_stopped(gateway, 20, "burst")
        gateway.daemon.sla.stop()
        commits = gateway.store.stats.commits
        async with outbox_of_its_own(gateway):
            await sink.wait_for(20)
            await wait_until(lambda: _all_in_state(gateway.store, "sent", 20))
        transactions = gateway.store.stats.commits - commits
        assert transactions <= 6, f"20 results in {transactions} transactions"
        kinds = [e.kind for n in range(1000, 1020) for e in await gateway.store.events(n)]
        assert kinds.count("delivered") == 20, "still one event per outcome"

    async def test_results_waiting_for_the_store_do_not_hold_up_the_next_sends(self, gateway, sink, monkeypatch):
        """relay.concurrency x 4 deliveries may be under way; one whose result waits to be recorded is not."""
        await routed_with_the_outbox_stopped(gateway, 24, "slowrec")
        async with outbox_of_its_own(gateway, commits_held=True, monkeypatch=monkeypatch) as release:
            await sink.wait_for(24)
            release.set()
            await wait_until(lambda: _all_in_state(gateway.store, "sent", 24))
        assert len(sink.received) == 24

    async def test_a_delivery_is_recorded_with_the_time_the_relay_took_it_not_the_time_of_the_commit(
            self, gateway, sink, monkeypatch):
        await routed_with_the_outbox_stopped(gateway, 1, "stamp")
        async with outbox_of_its_own(gateway, commits_held=True, monkeypatch=monkeypatch) as release:
            await sink.wait_for(1)
            taken = time.time()
            await asyncio.sleep(0.5)
            release.set()
            await wait_until(lambda: _all_in_state(gateway.store, "sent", 1))
        item = await forward_item(gateway.store)
        [updated_at] = await gateway.store.fetchone("SELECT updated_at FROM outbox WHERE id = ?", (item.id,))
        [delivered] = [e for e in await gateway.store.events(item.ticket) if e.kind == "delivered"]
        assert updated_at == delivered.at
        assert taken - 0.5 < updated_at <= taken + 0.1, "when the relay answered, half a second before the commit"

    async def test_a_scan_that_read_an_item_before_its_delivery_was_recorded_does_not_send_it_again(
            self, gateway, sink, monkeypatch):
        """Deliveries end while the next scan is still reading: its stale rows must not start them twice."""
        due_outbox = gateway.store.due_outbox

        async def slow_scan(now, limit):
            rows = await due_outbox(now, limit)
            await asyncio.sleep(0.2)
            return rows
        monkeypatch.setattr(gateway.store, "due_outbox", slow_scan)
        for n in range(6):
            await send_message(gateway.smtp_port, message(f"scan {n}", message_id=f"<scan{n}@customer.test>"))
        await wait_until(lambda: _all_in_state(gateway.store, "sent", 6))
        await asyncio.sleep(1.0)
        assert len(sink.received) == 6
        delivered = [e for n in range(1000, 1006) for e in await gateway.store.events(n) if e.kind == "delivered"]
        assert len(delivered) == 6


async def _all_in_state(store: Store, state: str, count: int) -> bool:
    items = await store.outbox(states=("pending", "failed", "sent"))
    return len(items) == count and all(i.state == state for i in items)
