"""Header handling: addresses, decoded text, forwards and gatewayd's own IDs.

These are the places where hostile header bytes meet gatewayd, so the specs lean on the
known attacks: CVE-2023-27043 (a second, hidden address) and CVE-2024-6923 (an encoded
CR/LF turning into a new header line).
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.addresses import AddressError, display_name, extract_address, parse_mailbox
from gatewayd.compose import assemble, forward_head, header
from gatewayd.ids import TicketIds, message_ids
from gatewayd.rawmessage import (HeaderSummary, decoded_text, fields, has_bare_newline, normalize_newlines,
                                 header_block)

IDS = TicketIds("SUP", "gw.example.test", b"test-secret-123")
INJECTION = "=?utf-8?q?hello=0D=0ABcc:_victim@evil.test?="


# --------------------------------------------------------------------------- addresses


class TestExtractAddress:
    def test_cve_2023_27043_payload_yields_nothing_never_the_hidden_address(self) -> None:
        assert extract_address("alice@example.org)<bob@example.org>") is None

    @pytest.mark.parametrize("value", [
        "alice@example.org)<bob@example.org>",
        "alice@example.org (<bob@example.org>)",
        "<alice@example.org>bob@example.org",
        "alice@example.org <bob@example.org>",
        "\"alice@example.org\" bob@example.org",
    ])
    def test_hostile_mixtures_never_yield_bob(self, value: str) -> None:
        assert extract_address(value) in (None, "alice@example.org")
        assert extract_address(value) != "bob@example.org"

    @pytest.mark.parametrize(("value", "address"), [
        ("carol@customer.example", "carol@customer.example"),
        ("<carol@customer.example>", "carol@customer.example"),
        ("Carol <carol@customer.example>", "carol@customer.example"),
        ("\"Smith, Carol\" <carol@customer.example>", "carol@customer.example"),
        ("=?utf-8?q?Car=C3=B6l?= <carol@customer.example>", "carol@customer.example"),
        ("Carol\r\n <carol@Customer.EXAMPLE>", "carol@customer.example"),
        ("Carol\t<carol@customer.example>", "carol@customer.example"),
        ("Carol.Smith@customer.example", "Carol.Smith@customer.example"),
    ])
    def test_a_single_clean_mailbox(self, value: str, address: str) -> None:
        assert extract_address(value) == address

    @pytest.mark.parametrize("value", [
        "alice@example.org, bob@example.org",
        "Alice <alice@example.org>, Bob <bob@example.org>",
        "friends: alice@example.org, bob@example.org;",
        "undisclosed-recipients:;",
        "Alice <alice@example.org> (work)",
        "alice@example.org (Alice)",
        "<alice@example.org> <bob@example.org>",
        "Alice <<alice@example.org>>",
        "Alice <alice@example.org",
        "",
        "   ",
        "not an address",
    ])
    def test_groups_lists_comments_and_junk_yield_nothing(self, value: str) -> None:
        assert extract_address(value) is None

    @pytest.mark.parametrize("value", [
        "alice@example.org\x00",
        "Alice\x00 <alice@example.org>",
        "Alice\x1f <alice@example.org>",
        "alice@example.org\x0b",
        "Alice\x85 <alice@example.org>",
        "Alice\u2028<alice@example.org>",
        "alice@example.org\nBcc: bob@example.org",
        "alice@example.org\rbob@example.org",
        "Alice\x7f <alice@example.org>",
    ])
    def test_control_characters_are_refused_not_smoothed_over(self, value: str) -> None:
        assert extract_address(value) is None


class TestParseMailbox:
    def test_lower_cases_the_domain_only(self) -> None:
        assert parse_mailbox("Carol@Customer.EXAMPLE") == "Carol@customer.example"

    @pytest.mark.parametrize("value", ['"carol smith"@customer.example', "carol+tag@customer.example",
                                       "carol@[192.0.2.1]"])
    def test_accepts_valid_forms(self, value: str) -> None:
        assert parse_mailbox(value) == value

    @pytest.mark.parametrize("value", ["carol", "carol@", "@customer.example", "carol@@customer.example",
                                       "carol@customer.example\x00", "carol smith@customer.example",
                                       "carol@-bad-.example", "a" * 250 + "@b.example", "<carol@customer.example>"])
    def test_refuses_invalid_forms(self, value: str) -> None:
        with pytest.raises(AddressError):
            parse_mailbox(value)

    def test_utf8_addresses_only_when_allowed(self) -> None:
        with pytest.raises(AddressError):
            parse_mailbox("jörg@bücher.example")
        assert parse_mailbox("jörg@bücher.example", utf8=True) == "jörg@bücher.example"

    def test_display_name_is_decoded_and_free_of_controls(self) -> None:
        assert display_name("=?utf-8?q?Car=C3=B6l?= <carol@customer.example>") == "Caröl"
        name = display_name("=?utf-8?q?Carol=0D=0ABcc=3A_victim?= <carol@customer.example>")
        assert name.startswith("Carol")
        assert "\r" not in name and "\n" not in name


# --------------------------------------------------------------------------- raw message


class TestDecodedText:
    def test_cve_2024_6923_encoded_crlf_becomes_one_line(self) -> None:
        text = decoded_text(INJECTION)
        assert "\r" not in text and "\n" not in text
        assert text == "hello Bcc: victim@evil.test"

    @pytest.mark.parametrize("value", [
        "=?utf-8?b?aGVsbG8NCkJjYzogdmljdGltQGV2aWwudGVzdA==?=",
        "=?iso-8859-1?q?a=0Db=0Ac=00d=7Fe=85f?=",
        "plain\x00text\x1bwith controls",
    ])
    def test_no_control_characters_survive(self, value: str) -> None:
        text = decoded_text(value)
        assert not any(ord(c) < 32 or ord(c) == 127 for c in text)

    def test_decodes_and_joins_encoded_words(self) -> None:
        assert decoded_text("=?utf-8?q?Caf=C3=A9?= =?utf-8?q?_au_lait?=") == "Café au lait"

    def test_broken_encodings_fall_back_to_the_raw_text(self) -> None:
        assert decoded_text("=?x-unknown?q?abc?=") == "=?x-unknown?q?abc?="

    def test_is_capped(self) -> None:
        assert len(decoded_text("x" * 5000)) == 998


class TestRawMessage:
    RAW = (b"Received: from a\r\nReceived: from b\r\nSubject: hello\r\n world\r\nMessage-ID:  <m@x.example> \r\n"
           b"X-Gatewayd-Ticket: SUP-1\r\nsubject: second\r\n\r\nbody\r\n\r\nmore\r\n")

    def test_the_header_block_ends_where_the_body_begins_byte_for_byte(self) -> None:
        head = header_block(self.RAW)
        body = self.RAW[len(head) + 2:]
        assert head.endswith(b"second\r\n")
        assert body == b"body\r\n\r\nmore\r\n"
        assert head + b"\r\n" + body == self.RAW

    @pytest.mark.parametrize(("data", "block"), [
        (b"\r\nbody", b""), (b"A: 1\r\nB: 2", b"A: 1\r\nB: 2"), (b"A: 1\r\n\r\n", b"A: 1\r\n")])
    def test_no_headers_and_no_body_are_both_possible(self, data: bytes, block: bytes) -> None:
        assert header_block(data) == block

    def test_fields_keep_their_folded_bytes(self) -> None:
        head = header_block(self.RAW)
        found = list(fields(head))
        assert [f.name for f in found] == ["received", "received", "subject", "message-id", "x-gatewayd-ticket",
                                           "subject"]
        assert found[2].raw == b"Subject: hello\r\n world"
        assert found[2].value == "hello world"

    def test_summary_uses_the_first_of_each_field_and_counts_hops(self) -> None:
        summary = HeaderSummary.of(self.RAW)
        assert summary.subject == "hello world"
        assert summary.message_id == "<m@x.example>"
        assert summary.received_count == 2
        assert summary.gatewayd_ticket_count == 1

    @pytest.mark.parametrize(("data", "bare"), [
        (b"a\r\nb\r\n", False), (b"a\nb\r\n", True), (b"a\rb\r\n", True), (b"a\r\r\n", True),
        (b"a\r\n\n", True), (b"a\x00\r\n", True), (b"", False)])
    def test_bare_newline_detection(self, data: bytes, bare: bool) -> None:
        assert has_bare_newline(data) is bare

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\x00", b"\xc3\xa9"]), max_size=30)
           .map(b"".join))
    def test_bare_newline_detection_agrees_with_counting_pairs(self, data: bytes) -> None:
        crlf = data.count(b"\r\n")
        assert has_bare_newline(data) is (data.count(b"\r") != crlf or data.count(b"\n") != crlf
                                          or b"\x00" in data)

    def test_normalize_makes_every_line_end_crlf(self) -> None:
        assert normalize_newlines(b"a\nb\rc\r\nd\x00e\r\r\n") == b"a\r\nb\r\nc\r\nde\r\n\r\n"
        assert not has_bare_newline(normalize_newlines(b"x\n\r\n\r.\r\n\n"))


# --------------------------------------------------------------------------- forwards


def original(subject: bytes | None = b"Printer on fire", extra: bytes = b"") -> bytes:
    lines = [b"From: Carol <carol@customer.example>", b"To: support@example.test"]
    if subject is not None:
        lines.append(b"Subject: " + subject)
    lines += [b"Message-ID: <m2@customer.example>", b"References: <m0@customer.example>\r\n <m1@customer.example>",
              b"Date: Mon, 1 Jan 2024 10:00:00 +0000", b"MIME-Version: 1.0",
              b"Content-Type: text/plain; charset=iso-8859-1", b"Content-Transfer-Encoding: 8bit"]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n" + BODY


BODY = b"Caf\xe9 is hot.\r\n=?utf-8?q?not_a_header?=\r\n.\r\n..leading dots\r\n\r\n\r\n"


def forward(raw: bytes, number: int = 1000, agent: str = "alice") -> tuple[bytes, bytes, str]:
    message_id = IDS.message_id(number)
    head = forward_head(IDS, number, raw, agent=agent, message_id=message_id, route_summary="round_robin: alice")
    return head, assemble(head, raw), message_id


def header_names(data: bytes) -> list[str]:
    head = header_block(data)
    return [f.name for f in fields(head)]


class TestForward:
    def test_our_headers_on_top_then_the_original_bytes(self) -> None:
        raw = original()
        head, out, message_id = forward(raw)
        assert out.startswith(head)
        assert b"X-Gatewayd-Ticket: SUP-1000\r\n" in head
        assert b"X-Gatewayd-Agent: alice\r\n" in head
        assert f"Message-ID: {message_id}\r\n".encode() in head
        assert b"Subject: [SUP-1000] Printer on fire\r\n" in head

    def test_the_body_is_byte_identical(self) -> None:
        raw = original()
        _, out, _ = forward(raw)
        assert out[len(header_block(out)) + 2:] == BODY
        assert out.endswith(b"\r\n\r\n" + BODY)

    def test_replaced_fields_are_kept_renamed(self) -> None:
        _, out, _ = forward(original())
        assert b"\r\nX-Original-Subject: Printer on fire\r\n" in out
        assert b"\r\nX-Original-Message-ID: <m2@customer.example>\r\n" in out
        assert b"\r\nX-Original-References: <m0@customer.example>\r\n <m1@customer.example>\r\n" in out
        names = header_names(out)
        for name in ("subject", "message-id", "references"):
            assert names.count(name) == 1, name

    def test_only_renamed_lines_differ_from_the_original(self) -> None:
        raw = original()
        head, out, _ = forward(raw)
        rest = out[len(head):]
        assert rest.replace(b"X-Original-", b"") == raw

    def test_references_chain_the_original_and_the_pseudo_reference(self) -> None:
        head, _, _ = forward(original())
        refs = message_ids(next(f.value for f in fields(head) if f.name == "references"))
        assert refs == ["<m0@customer.example>", "<m1@customer.example>", "<m2@customer.example>",
                        "<SUP-1000@gw.example.test>"]

    def test_the_forward_threads_back_to_the_ticket(self) -> None:
        head, _, message_id = forward(original())
        assert IDS.ticket_of_message_id(message_id) == 1000

    def test_an_existing_tag_is_not_doubled(self) -> None:
        raw = original(b"Re: [SUP-1000] Printer on fire")
        head, out, _ = forward(raw)
        assert b"Subject:" not in head
        assert b"X-Original-Subject" not in out
        assert out.count(b"[SUP-1000]") == 1
        assert header_names(out).count("subject") == 1

    @pytest.mark.parametrize("subject", [
        b"=?utf-8?q?Re=3A_=5BSUP-1000=5D_Caf=C3=A9?=",
        b"=?utf-8?b?UmU6IFtTVVAtMTAwMF0gQ2Fmw6k=?=",
    ])
    def test_a_tag_inside_an_encoded_subject_is_not_doubled(self, subject: bytes) -> None:
        head, _, _ = forward(original(subject))
        assert b"Subject:" not in head

    def test_another_tickets_tag_does_not_count(self) -> None:
        head, _, _ = forward(original(b"[SUP-999] old problem"))
        assert b"Subject: [SUP-1000] [SUP-999] old problem\r\n" in head

    def test_a_message_without_subject_gets_the_tag(self) -> None:
        head, out, _ = forward(original(None))
        assert b"Subject: [SUP-1000]\r\n" in head
        assert header_names(out).count("subject") == 1

    def test_the_encoded_crlf_subject_never_becomes_a_bcc_line(self) -> None:
        raw = original(INJECTION.encode())
        _, out, _ = forward(raw)
        assert not re.search(rb"(^|\r\n|\n|\r)bcc\s*:", out, re.IGNORECASE)
        parsed = email.message_from_bytes(out, policy=email.policy.default)
        assert parsed["Bcc"] is None
        assert b"Subject: [SUP-1000] " + INJECTION.encode() + b"\r\n" in out

    def test_the_raw_subject_bytes_are_reused_not_re_encoded(self) -> None:
        folded = b"=?iso-8859-1?q?Caf=E9?=\r\n =?iso-8859-1?q?_br=FBl=E9?="
        head, _, _ = forward(original(folded))
        assert b"Subject: [SUP-1000] " + folded + b"\r\n" in head

    def test_hostile_agent_names_cannot_inject_headers(self) -> None:
        head, _, _ = forward(original(), agent="alice\r\nBcc: victim@evil.test")
        assert b"\r\nBcc:" not in head
        assert all(line.startswith((b"X-", b"Message-ID", b"References", b"Subject", b" ")) for line in
                   head.split(b"\r\n") if line)

    def test_header_refuses_line_breaks(self) -> None:
        with pytest.raises(ValueError):
            header("Subject", "hello\r\nBcc: victim@evil.test")
        with pytest.raises(ValueError):
            header("Subject", "hello\nBcc: victim@evil.test")
        assert header("References", b"<a@b>\r\n <c@d>") == b"References: <a@b>\r\n <c@d>\r\n"

    def test_no_line_grows_past_998_characters(self) -> None:
        """Tagging and renaming add characters; a maximal original line must still fit afterwards."""
        long_subject = b"s" * (998 - len(b"Subject: "))
        raw = original(long_subject, extra=b"Message-ID: <" + b"m" * 970 + b"@x.example>\r\n")
        _, out, _ = forward(raw)
        assert max(len(line) for line in out.split(b"\r\n")) <= 998
        parsed = email.message_from_bytes(out, policy=email.policy.compat32)
        assert parsed["X-Original-Subject"].replace("\r\n", "").strip() == long_subject.decode()
        assert "".join(parsed["Subject"].split("\r\n")) == "[SUP-1000] " + long_subject.decode()

    def test_a_message_without_header_block_is_prepended_only(self) -> None:
        raw = b"\r\njust a body\r\n"
        head, out, _ = forward(raw)
        assert out == head + raw


# --------------------------------------------------------------------------- ids


class TestTicketIds:
    def test_refs_and_numbers(self) -> None:
        assert IDS.ref(1042) == "SUP-1042"
        assert IDS.number("SUP-1042") == 1042
        for bad in ("SUP-", "XYZ-1042", "SUP-10a", "SUP-1042 ", "sup-1042x"):
            assert IDS.number(bad) is None, bad

    def test_tags(self) -> None:
        assert IDS.tag(1042) == "[SUP-1042]"
        assert IDS.tags_in("Re: [SUP-1042] and [SUP-7] not SUP-9 nor [SUP-] nor [OPS-3]") == [1042, 7]
        assert IDS.tags_in("[SUP-1042x]") == []

    def test_pseudo_reference(self) -> None:
        assert IDS.pseudo_reference(1042) == "<SUP-1042@gw.example.test>"
        assert IDS.ticket_of_pseudo_reference("<SUP-1042@gw.example.test>") == 1042
        assert IDS.ticket_of_pseudo_reference("<SUP-1042@elsewhere.example>") is None

    def test_signed_message_ids_verify_and_differ_each_time(self) -> None:
        first, second = IDS.message_id(1042), IDS.message_id(1042)
        assert first != second
        assert re.fullmatch(r"<SUP-1042\.[0-9a-f]{12}\.[0-9a-f]{16}@gw\.example\.test>", first)
        assert IDS.ticket_of_message_id(first) == IDS.ticket_of_message_id(second) == 1042
        assert IDS.ticket_of_message_id(f"  {first} ") == 1042

    def test_a_signed_id_is_not_a_pseudo_reference_and_vice_versa(self) -> None:
        assert IDS.ticket_of_pseudo_reference(IDS.message_id(1042)) is None
        assert IDS.ticket_of_message_id(IDS.pseudo_reference(1042)) is None

    @pytest.mark.parametrize("tamper", [
        lambda m: m.replace("SUP-1042.", "SUP-1043."),
        lambda m: m[:18] + ("0" if m[18] != "0" else "1") + m[19:],
        lambda m: m[:-18] + ("0" if m[-18] != "0" else "1") + m[-17:],
        lambda m: m.replace("@gw.example.test", "@evil.example"),
        lambda m: m.replace("SUP-", "OPS-"),
        lambda m: m[:-18] + "@gw.example.test>",
    ], ids=["ticket", "nonce", "mac", "host", "prefix", "short-mac"])
    def test_tampered_ids_do_not_verify(self, tamper: Callable[[str], str]) -> None:
        genuine = IDS.message_id(1042)
        forged = tamper(genuine)
        assert forged != genuine
        assert IDS.ticket_of_message_id(forged) is None

    def test_an_id_signed_with_another_secret_does_not_verify(self) -> None:
        other = TicketIds("SUP", "gw.example.test", b"another-secret")
        assert IDS.ticket_of_message_id(other.message_id(1042)) is None

    def test_message_ids_are_found_in_order(self) -> None:
        assert message_ids("<a@x> junk <b@y>\r\n\t<c@z>") == ["<a@x>", "<b@y>", "<c@z>"]
        assert message_ids("no ids here") == []
