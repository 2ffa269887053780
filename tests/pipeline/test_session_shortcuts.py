"""Per-command shortcuts past aiosmtpd's slow paths: same results as aiosmtpd's own."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gatewayd.listener import GatewayLMTP, GatewaySMTP, SessionHandler
from tests.support.smtp import Client


def parsers() -> tuple[GatewaySMTP, SMTP]:
    # Never connected: only the path parser is used.
    return GatewaySMTP.__new__(GatewaySMTP), SMTP.__new__(SMTP)


PATHS = ["<carol@customer.test>", " <carol@customer.test> SIZE=1000 BODY=8BITMIME", "<a.b+c@d-e.f.test>",
         "<>", "<@relay.test:x@y.test>", '<"quoted local"@c.test>', "<a..b@c.test>", "<.a@c.test>",
         "<a@[127.0.0.1]>", "carol@customer.test", "<carol@customer.test", "<jos\u00e9@c.test> SMTPUTF8",
         "<a@b.test>>", "<a@b.test> <c@d.test>", ""]


@pytest.mark.parametrize("path", PATHS)
def test_fast_path_agrees_with_aiosmtpd(path):
    ours, theirs = parsers()
    assert ours._getaddr(path) == theirs._getaddr(path)


_atext = st.text(st.sampled_from("abcXYZ019.!#$%&'*+/=?^_`{|}~-\"@<> ()[]:;,\\\u00e9"), max_size=12)


@given(local=_atext, domain=_atext, rest=st.sampled_from(["", " SIZE=10", "  BODY=8BITMIME x", ">", " (c) X=1"]))
@example(local="", domain="0,(", rest="")  # email's tokenizer raises IndexError inside aiosmtpd
@settings(max_examples=500, deadline=None)
def test_fast_path_agrees_with_aiosmtpd_on_any_path(local, domain, rest):
    ours, theirs = parsers()
    path = f"<{local}@{domain}>{rest}"
    try:
        expected = theirs._getaddr(path)
    except (AttributeError, IndexError, TypeError, ValueError):
        expected = (None, None)  # where aiosmtpd's tokenizer trips, gatewayd answers a syntax error
    assert ours._getaddr(path) == expected


async def test_a_path_that_trips_the_tokenizer_is_a_syntax_error(gateway):
    client = await Client.connect(gateway.smtp_port)
    await client.greet()
    reply = await client.cmd("MAIL FROM:<a@[>")
    after = await client.cmd("NOOP")
    await client.close()
    assert reply.code == 553 and after.code == 250


@pytest.mark.parametrize("cls", [GatewaySMTP, GatewayLMTP])
async def test_sessions_find_every_command_and_hook_aiosmtpd_would(cls):
    """Sessions list only the names aiosmtpd's constructor scans for: the same commands, hooks and AUTH."""
    handler = SessionHandler.__new__(SessionHandler)
    session = cls(handler, slots=None, data_timeout=1, line_limit=1001, loop=asyncio.get_running_loop())
    every = object.__dir__(session)
    assert set(session._smtp_methods) == {n[5:] for n in every if n.startswith("smtp_")}
    assert set(session._auth_methods) == {"LOGIN", "PLAIN"}
    assert set(session._handle_hooks) == {n[7:] for n in object.__dir__(handler) if n.startswith("handle_")}
