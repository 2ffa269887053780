"""The relay is down for days, refuses at every stage, or crawls: forwards wait, retry and arrive once."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd import relay as relay_module
from gatewayd.config import Endpoint, RelayConfig
from gatewayd.relay import Relay
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
    @pytest.mark.parametrize("stage, answer", [
        *((stage, answer) for stage in ("banner", "mail", "rcpt", "end")
          for answer in ("421 4.3.2 System shutting down", "451 4.3.0 Try again later")),
        # A 5xx banner refuses gatewayd, not the message (Postfix's smtp_skip_5xx_greeting defers too).
        ("banner", "554 5.7.1 No SMTP service here"),
    ])
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

    @pytest.mark.parametrize("stage", ["mail", "rcpt", "end"])
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


class DroppingRelay(ScriptedRelay):
    """A scripted relay that can hang up on every open session, as an MTA does to idle clients."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.open: set[asyncio.StreamWriter] = set()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open.add(writer)
        try:
            await super()._session(reader, writer)
        finally:
            self.open.discard(writer)

    async def drop(self, last_words: bytes = b"") -> None:
        for writer in list(self.open):
            writer.write(last_words)
            writer.close()
        await asyncio.sleep(0.1)


@pytest.fixture
async def dropping() -> DroppingRelay:
    scripted = DroppingRelay(free_port())
    await scripted.start()
    yield scripted
    await scripted.stop()


async def delivered(relay: ScriptedRelay, count: int) -> None:
    async def arrived() -> bool:
        return len(relay.delivered) >= count
    await wait_until(arrived)


class TestSessionReuse:
    async def test_one_session_carries_consecutive_messages(self, gateway_factory, dropping):
        gw = await gateway_factory(relay_port=dropping.port)
        for n in range(4):
            await send_message(gw.smtp_port, message(f"reuse {n}", message_id=f"<r{n}@c.test>"))
            await delivered(dropping, n + 1)
        assert dropping.sessions == 1

    async def test_a_session_the_relay_dropped_is_replaced_without_costing_an_attempt(self, gateway_factory,
                                                                                       dropping):
        gw = await gateway_factory(relay_port=dropping.port)
        await send_message(gw.smtp_port, message("first", message_id="<d1@c.test>"))
        await delivered(dropping, 1)
        await dropping.drop()
        await send_message(gw.smtp_port, message("second", message_id="<d2@c.test>"))
        await delivered(dropping, 2)
        assert dropping.sessions == 2
        await wait_until(lambda: _all_sent(gw.store))
        assert all(i.attempts == 1 for i in await gw.store.outbox(states=("sent",)))

    async def test_a_421_the_relay_sent_before_hanging_up_costs_no_attempt_either(self, gateway_factory,
                                                                                     dropping):
        gw = await gateway_factory(relay_port=dropping.port)
        await send_message(gw.smtp_port, message("first", message_id="<q1@c.test>"))
        await delivered(dropping, 1)
        await dropping.drop(b"421 4.4.2 relay.test idle too long, closing\r\n")
        await send_message(gw.smtp_port, message("second", message_id="<q2@c.test>"))
        await delivered(dropping, 2)
        await wait_until(lambda: _all_sent(gw.store))
        assert all(i.attempts == 1 for i in await gw.store.outbox(states=("sent",)))

    async def test_a_relay_that_does_not_speak_smtp_is_retried_later(self, dropping):
        dropping.script = Script(answers={"mail": "hello there"})
        pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0), "gw.example.test")
        result = await pool.send("a@x.test", "b@y.test", b"Subject: 1\r\n\r\nx\r\n")
        assert result.outcome == "retry" and result.reply.startswith("ProtocolError: not an SMTP reply")
        assert pool.idle_sessions == 0

    async def test_sessions_are_closed_when_idle_and_at_shutdown(self, dropping):
        config = RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0, concurrency=2)
        pool = Relay(config, "gw.example.test", idle_seconds=0.3)
        assert (await pool.send("a@x.test", "b@y.test", b"Subject: 1\r\n\r\nx\r\n")).sent
        assert pool.idle_sessions == 1 and len(dropping.open) == 1
        await asyncio.sleep(0.6)
        assert pool.idle_sessions == 0 and not dropping.open, "closed after idle_seconds"

        results = await asyncio.gather(*(pool.send("a@x.test", "b@y.test", b"Subject: 2\r\n\r\nx\r\n")
                                         for _ in range(3)))
        assert all(r.sent for r in results)
        assert pool.idle_sessions == 2, "never more than relay.concurrency kept"
        await pool.close()
        await asyncio.sleep(0.1)
        assert not dropping.open

    async def test_a_refusal_ends_the_session(self, dropping):
        dropping.script = Script(answers={"rcpt": "550 5.1.1 no such user"})
        pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0), "gw.example.test")
        result = await pool.send("a@x.test", "b@y.test", b"Subject: 1\r\n\r\nx\r\n")
        assert result == relay_module.SendResult("failed", "550 5.1.1 no such user")
        assert pool.idle_sessions == 0
        await wait_until(lambda: _no_session_open(dropping))

    async def test_a_drop_noticed_only_at_mail_is_retried_on_a_new_session(self, dropping, monkeypatch):
        """The relay may hang up just after the idle check: MAIL then fails, and a new session takes the message."""
        pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0), "gw.example.test")
        assert (await pool.send("a@x.test", "b@y.test", b"Subject: 1\r\n\r\nx\r\n")).sent
        await dropping.drop()
        monkeypatch.setattr(relay_module.Session, "usable", property(lambda session: True))
        assert (await pool.send("a@x.test", "b@y.test", b"Subject: 2\r\n\r\nx\r\n")).sent
        assert dropping.sessions == 2 and len(dropping.delivered) == 2
        await pool.close()

    @pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-command-at-a-time"])
    async def test_each_stage_refused_is_reported_with_the_relays_words(self, dropping, pipelining):
        pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0), "gw.example.test")
        for stage, answer, outcome in [("mail", "451 4.3.0 try later", "retry"),
                                       ("rcpt", "550 5.1.1 no such user", "failed"),
                                       ("data", "554 5.5.1 no valid recipients", "failed"),
                                       ("end", "552 5.3.4 too big", "failed")]:
            dropping.script = Script(answers={stage: answer}, pipelining=pipelining)
            result = await pool.send("a@x.test", "b@y.test", b"Subject: 1\r\n\r\nx\r\n")
            assert result == relay_module.SendResult(outcome, answer), stage
        dropping.script = Script(pipelining=pipelining)
        assert (await pool.send("a@x.test", "b@y.test", b"Subject: 2\r\n\r\nx\r\n")).sent
        assert dropping.delivered == [b"Subject: 2\r\n\r\nx\r\n"]
        await pool.close()

    async def test_a_non_ascii_address_needs_smtputf8_and_8bit_content_is_declared(self, dropping):
        pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0), "gw.example.test")
        assert (await pool.send("a@x.test", "jörg@y.test", "Subject: ä\r\n\r\nö\r\n".encode())).sent
        assert dropping.delivered == ["Subject: ä\r\n\r\nö\r\n".encode()]
        assert dropping.mail_commands == [b"MAIL FROM:<a@x.test> BODY=8BITMIME SMTPUTF8"]
        await pool.close()


class TestDotStuffing:
    async def test_a_large_message_is_stuffed_off_the_event_loop(self, dropping, monkeypatch):
        stuffed_in: dict[int, str] = {}
        stuff = relay_module.dot_stuffed

        def recording(content: bytes) -> bytes:
            stuffed_in[len(content)] = threading.current_thread().name
            return stuff(content)

        monkeypatch.setattr(relay_module, "dot_stuffed", recording)
        pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0), "gw.example.test")
        small, large = b"Subject: s\r\n\r\nx\r\n", b"Subject: l\r\n\r\n" + (b"y" * 76 + b"\r\n") * 4000
        assert (await pool.send("a@x.test", "b@y.test", small)).sent
        assert (await pool.send("a@x.test", "b@y.test", large)).sent
        await pool.close()
        loop_thread = threading.current_thread().name
        assert stuffed_in[len(small)] == loop_thread and stuffed_in[len(large)] != loop_thread
        assert dropping.delivered[1] == large


    @pytest.mark.parametrize("content, sent", [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b".a\r\n", b"..a\r\n.\r\n"),
        (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n.\r\nb\rc", b"a\r\n..\r\nb\r\nc\r\n.\r\n"),
    ], ids=["leading-dot", "first-line", "a-lone-dot-line", "bare-lf-and-cr"])
    def test_content_can_never_end_the_data_early(self, content: bytes, sent: bytes) -> None:
        assert relay_module.dot_stuffed(content) == sent

    @given(st.binary(max_size=300))
    def test_the_relay_reads_back_exactly_the_lines_sent(self, content: bytes) -> None:
        """Whatever the content, un-stuffing what goes on the wire gives its lines back, and it ends only once."""
        wire = relay_module.dot_stuffed(content)
        assert wire.endswith(b"\r\n.\r\n") and wire.count(b"\r\n.\r\n") == 1 or wire == b".\r\n"
        body = wire[:-3]
        lines = [line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n")[:-1]]
        normal = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        assert lines == (normal[:-1] if normal.endswith(b"\n") else normal).split(b"\n") or not content


async def _all_sent(store: Store) -> bool:
    items = await store.outbox(states=("pending", "failed", "sent"))
    return len(items) == 2 and all(i.state == "sent" for i in items)


async def _no_session_open(relay: DroppingRelay) -> bool:
    return not relay.open


def self_signed(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate naming 127.0.0.1, and the relay side's context for it."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=relay",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context


@pytest.fixture(scope="module")
def relay_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    return self_signed(tmp_path_factory.mktemp("relay-tls"))


class TestStarttls:
    async def test_clear_text_answers_slipped_in_after_the_220_are_never_read(self, relay_tls):
        """A man in the middle appends "250 ok" lines to the 220 (CVE-2011-0411): the relay's own
        answers over TLS count, so a recipient it refuses is reported refused, not sent."""
        cert, context = relay_tls
        over_tls: list[bytes] = []

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 relay.test ESMTP\r\n")
            await reader.readline()
            writer.write(b"250-relay.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            await reader.readline()
            writer.write(b"220 go ahead\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 injected\r\n")
            await writer.drain()
            await writer.start_tls(context)
            while line := await reader.readline():
                over_tls.append(line.split(b" ")[0].upper())
                answers = {b"EHLO": b"250 relay.test\r\n", b"MAIL": b"250 2.1.0 ok\r\n",
                           b"RCPT": b"550 5.1.1 no such user\r\n", b"QUIT": b"221 bye\r\n"}
                writer.write(answers.get(line[:4].upper(), b"503 5.5.1 bad sequence\r\n"))
            writer.close()

        port = free_port()
        server = await asyncio.start_server(session, "127.0.0.1", port)
        try:
            pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", port), timeout=5.0, starttls=True, ca_file=cert),
                         "gw.example.test")
            result = await pool.send("a@x.test", "b@y.test", b"Subject: 1\r\n\r\nx\r\n")
            assert result == relay_module.SendResult("failed", "550 5.1.1 no such user")
            assert over_tls[:3] == [b"EHLO", b"MAIL", b"RCPT"]
            await pool.close()
        finally:
            server.close()

    async def test_a_renewed_relay_certificate_in_ca_file_is_trusted_without_a_restart(self, dropping, tmp_path):
        old_cert, old_context = self_signed(tmp_path / "old")
        new_cert, new_context = self_signed(tmp_path / "new")
        trusted = tmp_path / "relay-ca.pem"
        trusted.write_bytes(old_cert.read_bytes())
        pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0, starttls=True,
                                 ca_file=trusted), "gw.example.test", idle_seconds=0)
        dropping.script = Script(tls=old_context)
        assert (await pool.send("a@x.test", "b@y.test", b"Subject: 1\r\n\r\nx\r\n")).sent
        await pool.close()
        pool = Relay(pool.config, "gw.example.test", idle_seconds=0)
        dropping.script = Script(tls=new_context)
        refused = await pool.send("a@x.test", "b@y.test", b"Subject: 2\r\n\r\nx\r\n")
        assert refused.outcome == "retry" and "CERTIFICATE_VERIFY_FAILED" in refused.reply
        trusted.write_bytes(new_cert.read_bytes())
        assert (await pool.send("a@x.test", "b@y.test", b"Subject: 3\r\n\r\nx\r\n")).sent
        assert len(dropping.delivered) == 2
        await pool.close()

    async def test_a_relay_that_does_not_offer_starttls_gets_nothing_in_clear(self, dropping):
        pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0, starttls=True),
                     "gw.example.test")
        result = await pool.send("a@x.test", "b@y.test", b"Subject: 1\r\n\r\nx\r\n")
        assert result.outcome == "retry" and "does not offer STARTTLS" in result.reply
        assert dropping.mail_commands == []


async def test_an_address_that_could_inject_a_command_is_never_sent(dropping):
    pool = Relay(RelayConfig(address=Endpoint("127.0.0.1", dropping.port), timeout=5.0), "gw.example.test")
    result = await pool.send("a@x.test", "b@y.test>\r\nRCPT TO:<evil@z.test", b"Subject: 1\r\n\r\nx\r\n")
    assert result.outcome == "failed" and dropping.mail_commands == []
