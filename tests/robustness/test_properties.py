"""Property: no DATA bytes and no command sequence crash the server or alter what gets forwarded."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.forward import is_forward_of
from tests.support.probe import fresh_session_answers
from tests.support.smtp import Client, Reply

pytestmark = pytest.mark.slow

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LEAK = re.compile(r"Traceback|\(\w*(Error|Exception)\)|sqlite", re.IGNORECASE)
REFUSALS = {500, 550, 552, 554}

_names = st.sampled_from(["Subject", "From", "To", "Message-ID", "References", "Reply-To", "In-Reply-To",
                          "X-Original-Subject", "Received", "Content-Type", "X-Custom", "subject", "SUBJECT "])
_value_bytes = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=120)
    .map(lambda t: t.encode("utf-8")),
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"=?utf-8?q?a=0D=0ABcc:_x@evil.test?=", b"<m@c.test>", b"[SUP-1000] hi",
                     b"alice@example.org)<bob@example.org>", b"=?x-unknown?b?AAAA?="]),
)
_header = st.builds(lambda name, value, folds: name.encode() + b": " + value + b"".join(b"\r\n\t" + f for f in folds),
                    _names, _value_bytes,
                    st.lists(_value_bytes.filter(lambda v: v.strip() != b""), max_size=2))
_body_line = st.one_of(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                       st.sampled_from([b".", b"..", b".\r", b"", b"--b", b"\x00"]))
_structured = st.builds(lambda headers, body: b"\r\n".join(headers) + b"\r\n\r\n" + b"\r\n".join(body),
                        st.lists(_header, max_size=8), st.lists(_body_line, max_size=10))
DATA = st.one_of(_structured, st.binary(max_size=600))


async def stored(gateway) -> int:
    row = await gateway.store.fetchone("SELECT count(*) FROM messages")
    return int(row[0])


async def check_forward(gateway, accepted: bytes, before_stored: int, before_forwards: int) -> None:
    """A message that was stored (not a duplicate) reaches the relay exactly as accepted."""
    if await stored(gateway) == before_stored:
        return
    forwards = await gateway.sink.wait_for(before_forwards + 1, timeout=15)
    assert is_forward_of(forwards[before_forwards].content, accepted), forwards[before_forwards].content


@given(data=DATA)
@PROPERTY_SETTINGS
async def test_random_data_is_refused_clearly_or_forwarded_unchanged(gateway, data: bytes) -> None:
    before_stored, before_forwards = await stored(gateway), len(gateway.sink.received)
    client = await Client.connect(gateway.smtp_port)
    try:
        await client.greet()
        assert (await client.cmd("MAIL FROM:<carol@customer.test> BODY=8BITMIME")).code == 250
        assert (await client.cmd("RCPT TO:<support@example.test>")).code == 250
        [reply] = await client.data(data)
        assert (await client.cmd("NOOP")).code == 250
    finally:
        await client.close()
    event(f"reply {reply.code}")
    assert reply.code == 250 or reply.code in REFUSALS, reply
    assert not LEAK.search(reply.text), reply
    if reply.code == 250:
        await check_forward(gateway, data if data.endswith(b"\r\n") else data + b"\r\n",
                            before_stored, before_forwards)
    else:
        assert await stored(gateway) == before_stored
    await fresh_session_answers(gateway.smtp_port)


COMMANDS = st.one_of(
    st.sampled_from([
        "EHLO client.test", "HELO client.test", "LHLO client.test", "MAIL FROM:<carol@customer.test>",
        "MAIL FROM:<>", "MAIL FROM:<carol@customer.test> SIZE=999999999999", "MAIL FROM:<josé@c.test> SMTPUTF8",
        "MAIL FROM:<jos\u00e9@c.test>", "MAIL FROM:carol@customer.test", "RCPT TO:<support@example.test>",
        "RCPT TO:<other@example.test>", "RCPT TO:<support@example.test> NOTIFY=NEVER", "RCPT TO:<@relay:x@y>",
        "DATA", "DATA x", "RSET", "NOOP", "VRFY support", "EXPN staff", "HELP", "STARTTLS", "AUTH PLAIN AGFhAGI=",
        "BDAT 10 LAST", "QUIT", "MAIL FROM:<a\x01b@c.test>", "RCPT TO:<support@example.test\x00>", "",
    ]).map(lambda c: c.encode("utf-8")),
    st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
MESSAGE = (b"From: carol@customer.test\r\nSubject: random session\r\n\r\nbody\r\n")


async def exchange(client: Client, line: bytes) -> list[Reply]:
    """Sends one command line; answers a 354 with a message, so every line gets its replies."""
    await client.send(line + b"\r\n")
    replies = [await client.reply(timeout=5)]
    if replies[-1].code == 354:
        await client.send(MESSAGE + b".\r\n")
        replies.append(await client.reply(timeout=10))
    return replies


@given(commands=st.lists(COMMANDS, min_size=1, max_size=25))
@PROPERTY_SETTINGS
async def test_random_command_sequences_never_crash_the_server(gateway, commands: list[bytes]) -> None:
    before_stored, before_forwards = await stored(gateway), len(gateway.sink.received)
    client = await Client.connect(gateway.smtp_port)
    await client.reply()
    replies: list[Reply] = []
    try:
        for line in commands:
            try:
                replies += await exchange(client, line)
            except (ConnectionError, OSError):
                await client.close()
                client = await Client.connect(gateway.smtp_port)
                assert (await client.reply()).code == 220
    finally:
        await client.close()
    event(f"{await stored(gateway) - before_stored} message(s) accepted")
    for reply in replies:
        assert 200 <= reply.code < 600, reply
        assert not LEAK.search(reply.text), reply
    accepted = await stored(gateway) - before_stored
    forwards = await gateway.sink.wait_for(before_forwards + accepted, timeout=15)
    for forward in forwards[before_forwards:]:
        assert is_forward_of(forward.content, MESSAGE), forward.content
    await fresh_session_answers(gateway.smtp_port)
