"""Hostile and broken clients: each one is answered or cut, and everyone else keeps being served."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.probe import Bystander, fresh_session_answers
from tests.support.smtp import Client, message, send_message

pytestmark = pytest.mark.slow


async def timed_send(port: int, subject: str) -> float:
    started = time.monotonic()
    [reply] = await send_message(port, message(subject, message_id=f"<{subject}@customer.test>"))
    assert reply.code == 250, reply
    return time.monotonic() - started


async def dribble(port: int, every: float, deadline: float) -> tuple[float, str]:
    """Starts DATA and sends one byte every ``every`` seconds; returns when and how it was cut."""
    client = await Client.connect(port)
    await client.greet()
    await client.cmd("MAIL FROM:<slow@customer.test>")
    await client.cmd("RCPT TO:<support@example.test>")
    assert (await client.cmd("DATA")).code == 354
    started = time.monotonic()
    payload = message("dribbled") * 50
    try:
        for index in range(int(deadline * 3 / every)):
            try:
                await client.send(payload[index:index + 1])
                line = await asyncio.wait_for(client.reader.readline(), every)
            except TimeoutError:
                continue
            except ConnectionError:
                return time.monotonic() - started, ""
            return time.monotonic() - started, line.decode()
        raise AssertionError("the slow client was never cut")
    finally:
        client.writer.transport.abort()


class TestSlowClients:
    async def test_byte_dribbling_clients_are_cut_at_the_data_deadline_while_others_are_served(self, gateway_factory):
        gw = await gateway_factory(limits="  data_timeout: 2s\n")
        slow = [asyncio.create_task(dribble(gw.smtp_port, 0.5, 2.0)) for _ in range(20)]
        await asyncio.sleep(0.3)
        async with Bystander(gw.smtp_port) as bystander:
            served = [await timed_send(gw.smtp_port, f"served-{n}") for n in range(10)]
            cuts = await asyncio.wait_for(asyncio.gather(*slow), 15)
        bystander.assert_responsive()
        assert max(served) < 1.0, served
        for seconds, line in cuts:
            assert line.startswith("421 4.4.2"), line
            assert 1.8 <= seconds < 3.5, seconds
        row = await gw.store.fetchone("SELECT count(*) FROM messages")
        assert row[0] == 10, "only the served clients' messages are stored"

    async def test_a_client_that_stops_reading_does_not_stall_the_others(self, gateway):
        stuck = await Client.connect(gateway.smtp_port)
        await stuck.greet()
        stuck.writer.write(b"NOOP\r\n" * 200_000)
        async with Bystander(gateway.smtp_port) as bystander:
            await asyncio.sleep(1.0)
            await timed_send(gateway.smtp_port, "while-stuck")
        bystander.assert_responsive()
        stuck.writer.transport.abort()


class TestFloods:
    async def test_a_pipelined_flood_of_commands_is_answered_in_order(self, gateway):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        count = 5000
        async with Bystander(gateway.smtp_port) as bystander:
            await client.send(b"NOOP\r\nRSET\r\n" * (count // 2))
            codes = [(await client.reply()).code for _ in range(count)]
        bystander.assert_responsive()
        assert codes == [250] * count
        await client.close()

    async def test_a_flood_of_unknown_commands_ends_the_session_with_a_5xx(self, gateway):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        await client.send(b"XYZZY\r\n" * 1000)
        codes = []
        for _ in range(1000):
            try:
                codes.append((await client.reply(timeout=5)).code)
            except ConnectionError:
                break
        assert codes and all(500 <= c < 600 for c in codes)
        assert len(codes) < 1000, "an endless stream of junk commands must end the session"
        await client.close()
        await fresh_session_answers(gateway.smtp_port)

    async def test_a_flood_of_transactions_on_one_session(self, gateway):
        client = await Client.connect(gateway.smtp_port)
        await client.greet()
        one = b"MAIL FROM:<carol@customer.test>\r\nRCPT TO:<support@example.test>\r\nDATA\r\n"
        await client.send(b"".join(one + message(f"pipelined {n}", message_id=f"<p{n}@customer.test>") + b".\r\n"
                                   for n in range(100)))
        codes = [(await client.reply()).code for _ in range(400)]
        await client.close()
        assert codes == [250, 250, 354, 250] * 100
        assert len(await gateway.sink.wait_for(100, timeout=30)) == 100

    async def test_connections_beyond_the_limit_get_421_and_the_admitted_are_served(self, gateway_factory):
        gw = await gateway_factory(limits="  max_connections: 20\n")
        held = [await Client.connect(gw.smtp_port) for _ in range(19)]
        for client in held:
            assert (await client.reply()).code == 220
        async with Bystander(gw.smtp_port) as bystander:
            refused = 0
            for _ in range(100):
                extra = await Client.connect(gw.smtp_port)
                reply = await extra.reply()
                await extra.close()
                assert reply.code == 421 and reply.text.startswith("4.7.0"), reply
                refused += 1
            await held[0].cmd("EHLO client.test")
            await held[0].cmd("MAIL FROM:<carol@customer.test>")
            await held[0].cmd("RCPT TO:<support@example.test>")
            [accepted] = await held[0].data(message())
        bystander.assert_responsive()
        assert refused == 100 and accepted.code == 250
        for client in held:
            await client.close()
        await asyncio.sleep(0.1)
        await fresh_session_answers(gw.smtp_port)


class TestRecipients:
    @pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
    async def test_200_recipients_the_excess_get_452_and_the_message_is_accepted_once(self, gateway, lmtp):
        client = await Client.connect(gateway.lmtp_port if lmtp else gateway.smtp_port)
        await client.greet(lmtp)
        await client.cmd("MAIL FROM:<carol@customer.test>")
        await client.send(b"RCPT TO:<support@example.test>\r\n" * 200)
        replies = [await client.reply() for _ in range(200)]
        assert [r.code for r in replies] == [250] * 100 + [452] * 100
        assert all(r.text.startswith("4.5.3") for r in replies[100:])
        answers = await client.data(message(), rcpt_count=100 if lmtp else 1)
        await client.close()
        assert [a.code for a in answers] == [250] * len(answers)
        assert len({a.text for a in answers}) == 1
        assert len(await gateway.sink.wait_for(1)) == 1
        await asyncio.sleep(0.3)
        assert len(gateway.sink.received) == 1, "one message, one forward, however many recipients"
