"""MAIL/RCPT path parsing: gatewayd's fast path gives exactly what aiosmtpd's parser gives."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.listener import GatewaySMTP
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
@settings(max_examples=500, deadline=None)
def test_fast_path_agrees_with_aiosmtpd_on_any_path(local, domain, rest):
    ours, theirs = parsers()
    path = f"<{local}@{domain}>{rest}"
    try:
        expected = theirs._getaddr(path)
    except AttributeError:
        expected = (None, None)
    assert ours._getaddr(path) == expected


async def test_a_path_that_trips_the_tokenizer_is_a_syntax_error(gateway):
    client = await Client.connect(gateway.smtp_port)
    await client.greet()
    reply = await client.cmd("MAIL FROM:<a@[>")
    after = await client.cmd("NOOP")
    await client.close()
    assert reply.code == 553 and after.code == 250
