"""Rate limits: one receipt per ticket, per sender, per domain, per day; a naive autoresponder is stopped."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gatewayd.autoreply import rate_limited, record
from gatewayd.config import RateConfig
from gatewayd.store import Store, Tx
from tests.autoreply.conftest import autoreply_yaml, forwards, outcome, receipts, settle
from tests.support.smtp import message, send_message


async def ticket_row(store: Store, number: int) -> None:
    async def insert(tx: Tx) -> None:
        await tx.execute("INSERT INTO tickets (number, subject, customer, created_at, updated_at) "
                         "VALUES (?, 's', 'c@x.test', 0, 0)", (number,))
    await store.transact(insert)


class TestLimitsInTheStore:
    async def test_one_receipt_per_ticket(self, tmp_path: Path) -> None:
        async with await Store.open(tmp_path / "s.sqlite3") as store:
            await ticket_row(store, 1)
            rate = RateConfig()
            now = time.time()
            assert await store.transact(lambda tx: rate_limited(tx, rate, 1, "receipt", "a@x.test", now)) is None
            await store.transact(lambda tx: record(tx, 1, "receipt", "a@x.test", now))
            assert await store.transact(
                lambda tx: rate_limited(tx, rate, 1, "receipt", "b@y.test", now)) == "rate_ticket"
            assert await store.transact(lambda tx: rate_limited(tx, rate, 1, "followup", "b@y.test", now)) is None

    async def test_the_sender_window_slides(self, tmp_path: Path) -> None:
        async with await Store.open(tmp_path / "s.sqlite3") as store:
            rate = RateConfig(per_sender=2, window=600)
            start = time.time()
            for n in (1, 2, 3):
                await ticket_row(store, n)
            for n, at in ((1, start), (2, start + 60)):
                await store.transact(lambda tx, n=n, at=at: record(tx, n, "receipt", "A@x.test", at))
            assert await store.transact(
                lambda tx: rate_limited(tx, rate, 3, "receipt", "a@x.test", start + 120)) == "rate_sender"
            assert await store.transact(lambda tx: rate_limited(tx, rate, 3, "receipt", "a@x.test", start + 601)) \
                is None


class TestLimitsEndToEnd:
    async def test_per_sender(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml(rate="{per_sender: 2, per_domain: 10, window: 10m}"))
        for n in range(3):
            raw = message(f"question {n}", message_id=f"<q{n}@customer.test>")
            assert (await send_message(gw.smtp_port, raw))[0].code == 250
        reasons = [(await outcome(gw.store, 1000 + n)).detail.get("reason") for n in range(3)]
        assert reasons == [None, None, "rate_sender"]
        await settle(gw.sink, 5)
        assert len(receipts(gw.sink)) == 2 and len(forwards(gw.sink)) == 3

    async def test_per_domain(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml(rate="{per_sender: 5, per_domain: 2, window: 10m}"))
        for n, who in enumerate(("ann", "ben", "cid")):
            raw = message(sender=f"{who}@customer.test", message_id=f"<d{n}@customer.test>")
            assert (await send_message(gw.smtp_port, raw, mail_from=f"{who}@customer.test"))[0].code == 250
        reasons = [(await outcome(gw.store, 1000 + n)).detail.get("reason") for n in range(3)]
        assert reasons == [None, None, "rate_domain"]
        await settle(gw.sink, 5)
        assert len(forwards(gw.sink)) == 3

    async def test_daily_cap(self, gateway_factory) -> None:
        gw = await gateway_factory(extra=autoreply_yaml(rate="{per_sender: 5, per_domain: 5, daily: 2}"))
        for n, domain in enumerate(("a.test", "b.test", "c.test")):
            raw = message(sender=f"x@{domain}", message_id=f"<c{n}@{domain}>")
            assert (await send_message(gw.smtp_port, raw, mail_from=f"x@{domain}"))[0].code == 250
        reasons = [(await outcome(gw.store, 1000 + n)).detail.get("reason") for n in range(3)]
        assert reasons == [None, None, "rate_daily"]


class TestAutoresponderPingPong:
    async def test_a_naive_autoresponder_is_stopped_within_a_few_rounds(self, gateway_factory) -> None:
        """The bot answers every receipt with a fresh message: no threading headers, no Auto-Submitted."""
        gw = await gateway_factory(extra=autoreply_yaml())
        bot = "bot@robot.test"
        answered = 0
        raw = message("Hello", sender=f"Bot <{bot}>", message_id="<bot-0@robot.test>")
        assert (await send_message(gw.smtp_port, raw, mail_from=bot))[0].code == 250
        for round_ in range(1, 10):
            await outcome(gw.store, 999 + round_)
            await asyncio.sleep(0.3)
            got = receipts(gw.sink, bot)
            if len(got) == answered:
                break
            answered = len(got)
            subject = f"Re: Thank you for your message (round {round_})"
            raw = message(subject, sender=f"Bot <{bot}>", message_id=f"<bot-{round_}@robot.test>")
            assert (await send_message(gw.smtp_port, raw, mail_from=bot))[0].code == 250
        assert answered == 3
        events = [e for n in range(1000, 1004) for e in await gw.store.events(n) if e.kind == "autoreply_suppressed"]
        assert [e.detail["reason"] for e in events] == ["rate_sender"]
        await settle(gw.sink, 7)
        assert len(forwards(gw.sink)) == 4
