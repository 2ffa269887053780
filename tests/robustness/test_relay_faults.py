"""The relay is down for days, refuses at every stage, or crawls: forwards wait, retry and arrive once."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

import pytest

from gatewayd.store import OutboxItem, Store
from tests.support.gateway import free_port
from tests.support.probe import Bystander
from tests.support.relay import Script, ScriptedRelay
from tests.support.smtp import message, send_message

pytestmark = pytest.mark.slow

HOUR = 3600.0


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def has_forward(store: Store) -> bool:
    return any(i.kind == "forward" for i in await store.outbox(states=("pending", "failed", "sent")))


async def forward(store: Store) -> OutboxItem:
    [item] = [i for i in await store.outbox(states=("pending", "failed", "sent")) if i.kind == "forward"]
    return item


class SimulatedClock:
    """Wall-clock time that a test moves forward by days in milliseconds."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def relay() -> ScriptedRelay:
    scripted = ScriptedRelay(free_port())
    await scripted.start()
    yield scripted
    await scripted.stop()


class TestLongOutage:
    async def test_two_days_down_with_a_restart_in_between_then_delivered_once(self, gateway_factory, relay):
        await relay.stop()
        retry = "{first: 1m, max: 1h, give_up: 5d}"
        gw = await gateway_factory(relay_port=relay.port, retry=retry)
        clock = SimulatedClock()
        gw.daemon.outbox.clock = clock
        [reply] = await send_message(gw.smtp_port, message(message_id="<outage@c.test>"))
        assert reply.code == 250
        await wait_until(lambda: has_forward(gw.store))

        async def step_to_next_attempt(outbox_owner) -> OutboxItem:
            item = await forward(outbox_owner.store)
            clock.offset = max(clock.offset, item.next_attempt_at - time.time() + 0.001)
            outbox_owner.daemon.outbox.wake()

            async def attempted() -> bool:
                return (await forward(outbox_owner.store)).attempts > item.attempts
            await wait_until(attempted)
            return await forward(outbox_owner.store)

        async def first_attempt() -> bool:
            return (await forward(gw.store)).attempts == 1
        await wait_until(first_attempt)
        delays = [(await forward(gw.store)).next_attempt_at - clock()]
        owner = gw
        while clock.offset < 2 * 24 * HOUR:
            item = await step_to_next_attempt(owner)
            assert item.state == "pending", item
            delays.append(item.next_attempt_at - clock())
            if clock.offset > 24 * HOUR and owner is gw:
                await gw.daemon.shutdown()
                owner = await gateway_factory(relay_port=relay.port, retry=retry,
                                              smtp_port=gw.smtp_port, lmtp_port=gw.lmtp_port)
                owner.daemon.outbox.clock = clock
        assert owner is not gw, "the daemon was restarted during the outage"
        assert delays[0] == pytest.approx(60, abs=2)
        assert max(delays) == pytest.approx(HOUR, abs=2), "backoff doubles up to retry.max and stays there"
        assert all(b >= a - 2 for a, b in itertools.pairwise(delays))

        await relay.start()
        item = await step_to_next_attempt(owner)
        assert item.state == "sent"
        assert item.attempts == len(delays) + 1, "one attempt per backoff step, none lost to the restart"
        assert len(relay.delivered) == 1
        assert b"Message-ID: " + item.message_id.encode() + b"\r\n" in relay.delivered[0]
        kinds = [e.kind for e in await owner.store.events(1000)]
        assert kinds.count("delivery_deferred") == len(delays) and kinds[-1] == "delivered"


class TestRefusals:
    @pytest.mark.parametrize("stage", ["banner", "mail", "rcpt", "end"])
    @pytest.mark.parametrize("answer", ["421 4.3.2 System shutting down", "451 4.3.0 Try again later"])
    async def test_a_temporary_refusal_at_any_stage_is_retried_until_it_goes_through(
            self, gateway_factory, relay, stage, answer):
        relay.script = Script(answers={stage: answer})
        gw = await gateway_factory(relay_port=relay.port)
        [reply] = await send_message(gw.smtp_port, message())
        assert reply.code == 250
        await wait_until(lambda: has_forward(gw.store))

        async def retried() -> bool:
            return (await forward(gw.store)).attempts >= 2
        await wait_until(retried)
        item = await forward(gw.store)
        assert item.state == "pending" and item.last_error.startswith(answer[:3])
        relay.script = Script()
        await wait_until(lambda: _state(gw.store, "sent"))
        assert len(relay.delivered) == 1
        assert f"Message-ID: {item.message_id}\r\n".encode() in relay.delivered[0]

    @pytest.mark.parametrize("stage", ["banner", "mail", "rcpt", "end"])
    async def test_a_permanent_refusal_fails_the_item_at_once_and_keeps_it_visible(self, gateway_factory, relay, stage):
        relay.script = Script(answers={stage: "550 5.7.1 Refused by policy"})
        gw = await gateway_factory(relay_port=relay.port)
        [reply] = await send_message(gw.smtp_port, message())
        assert reply.code == 250
        await wait_until(lambda: has_forward(gw.store))
        await wait_until(lambda: _state(gw.store, "failed"))
        item = await forward(gw.store)
        assert item.attempts == 1 and item.last_error.startswith("550 5.7.1")
        assert [i.id for i in await gw.store.outbox()] == [item.id]
        assert relay.delivered == []


class TestSlowRelay:
    async def test_a_slow_relay_delays_forwards_but_never_intake(self, gateway_factory, relay):
        relay.script = Script(delay=0.4)
        gw = await gateway_factory(relay_port=relay.port)
        async with Bystander(gw.smtp_port) as bystander:
            for n in range(12):
                started = time.monotonic()
                [reply] = await send_message(gw.smtp_port, message(f"slow {n}", message_id=f"<s{n}@c.test>"))
                assert reply.code == 250 and time.monotonic() - started < 1.0
        bystander.assert_responsive()

        async def all_sent() -> bool:
            return len(relay.delivered) == 12
        await wait_until(all_sent, timeout=60)

    async def test_a_relay_slower_than_the_timeout_is_retried_not_waited_on_forever(self, gateway_factory, relay):
        relay.script = Script(delay=3.0)
        gw = await gateway_factory(relay_port=relay.port, relay_timeout="1s")
        [reply] = await send_message(gw.smtp_port, message())
        assert reply.code == 250
        await wait_until(lambda: has_forward(gw.store))

        async def timed_out() -> bool:
            item = await forward(gw.store)
            return item.attempts >= 1 and item.state == "pending"
        await wait_until(timed_out)
        assert "timed out" in (await forward(gw.store)).last_error.lower()
        relay.script = Script()
        await wait_until(lambda: _state(gw.store, "sent"))
        assert len(relay.delivered) == 1


async def _state(store: Store, state: str) -> bool:
    return (await forward(store)).state == state
