"""message_view_from_bytes: decoded views of whatever arrived, never an exception."""

from __future__ import annotations

import functools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd import message_view
from gatewayd.message_view import _clean, _clean_start, message_view_from_bytes

RCPT = ["support@example.test"]


def view(raw: bytes, **kw):
    return message_view_from_bytes(raw, "bounce@example.org", RCPT, **kw)


def test_plain_message_with_encoded_subject_and_auth_results():
    raw = (b"From: =?utf-8?q?Zo=C3=AB?= <Zoe@Example.ORG>\r\n"
           b"To: support@example.test\r\n"
           b"Subject: =?utf-8?b?UsOpY2xhbWF0aW9u?= urgent\r\n"
           b"Authentication-Results: gw.example.test; dkim=pass header.d=example.org\r\n"
           b"Authentication-Results: gw.example.test; spf=fail\r\n"
           b"Message-ID: <abc@example.org>\r\n"
           b"\r\nHello,\r\nmy card was charged.\r\n")
    message = view(raw)
    assert message.subject == "Réclamation urgent"
    assert message.sender == "zoe@example.org"
    assert message.body == "Hello,\nmy card was charged."
    assert message.authentication_results == ("gw.example.test; dkim=pass header.d=example.org",
                                              "gw.example.test; spf=fail")
    assert message.header("AUTHENTICATION-RESULTS").endswith("header.d=example.org")
    assert message.message_id == "<abc@example.org>"
    assert message.rcpt_tos == ("support@example.test",)


def test_first_text_plain_part_wins_over_html_and_attachments():
    raw = b"""\
Subject: parts
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="b1"

--b1
Content-Type: text/plain; name="notes.txt"
Content-Disposition: attachment

attached text
--b1
Content-Type: multipart/alternative; boundary="b2"

--b2
Content-Type: text/html; charset=iso-8859-1

<p>caf\xe9</p>
--b2
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

caf=E9 au lait
--b2--
--b1--
"""
    assert view(raw).body == "café au lait"


def test_html_only_is_stripped_of_tags_and_scripts():
    raw = (b"Subject: html\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<html><head><style>p{}</style></head><body><p>Fraud &amp; phishing</p>"
           b"<script>alert(1)</script><div>second line</div></body></html>")
    assert view(raw).body == "Fraud & phishing\nsecond line"


def test_unknown_charset_nul_bytes_and_body_limit():
    raw = (b"Subject: odd\x00 one\r\nContent-Type: text/plain; charset=x-klingon\r\n\r\n"
           b"abc\x00def\xff" + b"x" * 100)
    message = view(raw, max_body=10)
    assert message.subject == "odd one"
    assert message.body.startswith("abcdef\ufffd") and len(message.body) == 10


def test_deep_mime_stops_at_max_depth():
    depth = 150
    raw = b"Subject: deep\r\n"
    for i in range(depth):
        raw += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
    raw += b"Content-Type: text/plain\r\n\r\nburied\r\n"
    shallow = view(raw, max_depth=5)
    assert shallow.subject == "deep" and shallow.body == ""
    assert view(raw, max_depth=1000).body.startswith("buried")


def test_broken_from_falls_back_to_envelope():
    raw = b"From: alice@example.org)<bob@example.org>\r\nSubject: x\r\n\r\nbody"
    assert view(raw).sender == "bounce@example.org"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600))
def test_never_raises_on_garbage(raw: bytes):
    message = view(b"Content-Type: multipart/mixed; boundary=x\r\n" + raw)
    assert isinstance(message.body, str) and isinstance(message.subject, str)


_REFERENCE_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@given(st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from("\r\n\x00\x7f\x0b\t \u00e9\u4e2d")))
@settings(max_examples=500, deadline=None)
def test_body_text_has_lf_line_ends_no_control_characters_and_no_runs_of_blank_lines(text):
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    expected = re.sub(r"\n{3,}", "\n\n", _REFERENCE_CONTROL.sub("", expected)).strip()
    assert _clean(text) == expected


@given(st.text(st.sampled_from("ab \t\r\n\x00\x0b")), st.integers(0, 40))
@settings(max_examples=1000, deadline=None)
def test_a_long_body_is_cleaned_only_as_far_as_it_is_kept(text, limit):
    assert _clean_start(text, limit) == _clean(text)[:limit]


_field = st.sampled_from([b"Subject: hi", b"Content-Type: text/plain; charset=utf-8", b"Content-Type: text/html",
                          b"Content-Type: multipart/mixed; boundary=b", b"Content-Type: message/rfc822",
                          b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable",
                          b"From: =?utf-8?q?Caf=C3=A9?= <a@b.test>", b"X-Folded: a\r\n\tb", b"not a header",
                          b" continuation", b"Content-Type: text/plain; charset=x-unknown"])
_line = st.one_of(st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                  st.sampled_from([b"--b", b"--b--", b"", b"Content-Type: text/plain", b"aGVsbG8=", b"caf=C3=A9="]))


@given(fields=st.lists(_field, max_size=6), body=st.lists(_line, max_size=12), blank=st.booleans())
@settings(max_examples=400, deadline=None)
def test_a_single_part_body_handed_over_whole_gives_the_same_view(fields, body, blank, monkeypatch_module):
    raw = b"\r\n".join(fields) + (b"\r\n\r\n" if blank else b"\r\n") + b"\r\n".join(body)
    fast = message_view_from_bytes(raw, "a@b.test", RCPT)
    with monkeypatch_module.context() as patch:
        patch.setattr(message_view, "parse", functools.partial(message_view.parse, whole=True))
        whole = message_view_from_bytes(raw, "a@b.test", RCPT)
    assert (fast.subject, fast.sender, fast.body, dict(fast.headers), fast.message_id) == \
        (whole.subject, whole.sender, whole.body, dict(whole.headers), whole.message_id)


@given(fields=st.lists(_field, max_size=6), body=st.lists(_line, max_size=12), blank=st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_deferred_body_gives_the_same_view(fields, body, blank):
    raw = b"\r\n".join(fields) + (b"\r\n\r\n" if blank else b"\r\n") + b"\r\n".join(body)
    deferred = view(raw, defer_body=True)
    assert "body" not in vars(deferred)
    assert deferred == view(raw)
    assert "body" in vars(deferred)


def test_a_deferred_body_is_extracted_once_on_first_read(monkeypatch):
    calls = []
    original = message_view._extract_body
    monkeypatch.setattr(message_view, "_extract_body", lambda *args: calls.append(args) or original(*args))
    deferred = view(b"Subject: s\r\n\r\nHello\r\n", defer_body=True)
    assert calls == []
    assert deferred.subject == "s" and deferred.headers["subject"] == ("s",)
    assert calls == []
    assert deferred.body == deferred.body == "Hello"
    assert len(calls) == 1
    assert "_extract_body" not in vars(deferred), "nor the message it kept for the extraction"


@pytest.mark.parametrize("defer_body", [False, True])
def test_hostile_mime_keeps_its_parsed_headers_when_the_body_falls_back(monkeypatch, defer_body):
    def gives_up(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(message_view, "parse", gives_up)
    raw = b"Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nhi\r\n"
    message = view(raw, defer_body=defer_body)
    assert message.subject == "café"
    assert message.body == "--b\nhi"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch
