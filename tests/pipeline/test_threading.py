"""Threading and intake rules, through the real Intake and a real SQLite store, without sockets.

First match wins: (1) gatewayd's own signed Message-ID, from anyone; (2) a reference to a stored
Message-ID or the pseudo-reference, only from a participant; (3) the subject tag, only from a
participant. Subject text alone never threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatewayd import config as config_module
from gatewayd.config import Config
from gatewayd.ids import TicketIds
from gatewayd.intake import Accepted, Intake, Refused, Transaction
from gatewayd.store import Store
from tests.support.gateway import config_text

CUSTOMER = "carol@customer.example"
STRANGER = "mallory@elsewhere.example"
SUPPORT = "support@example.test"


def message(sender: str = CUSTOMER, subject: str = "Printer on fire", *, message_id: str | None = None,
            in_reply_to: str | None = None, references: str | None = None, extra: str = "",
            body: str = "It started smoking this morning.\r\n") -> bytes:
    lines = [f"From: Someone <{sender}>", f"To: <{SUPPORT}>", f"Subject: {subject}",
             "Date: Mon, 1 Jan 2024 10:00:00 +0000"]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    if in_reply_to:
        lines.append(f"In-Reply-To: {in_reply_to}")
    if references:
        lines.append(f"References: {references}")
    head = "\r\n".join(lines) + "\r\n" + extra
    return (head + "\r\n" + body).encode()


@dataclass
class Desk:
    """The intake under test, its store and the ID scheme, with a few shortcuts."""

    config: Config
    store: Store
    ids: TicketIds
    intake: Intake

    async def receive(self, data: bytes, *, mail_from: str = CUSTOMER,
                      rcpt_tos: tuple[str, ...] = (SUPPORT,)) -> Accepted:
        return await self.intake.accept(Transaction(listener="smtp", peer="127.0.0.1:1", mail_from=mail_from,
                                                    rcpt_tos=rcpt_tos, data=data))

    async def count(self, table: str) -> int:
        row = await self.store.fetchone(f"SELECT count(*) FROM {table}")
        assert row is not None
        return row[0]


async def open_desk(tmp_path: Path, limits: str = "") -> AsyncIterator[Desk]:
    text = config_text(tmp_path, smtp_port=2525, lmtp_port=2424, relay_port=2526, limits=limits)
    config = config_module.loads(text, "test.yaml")
    store = await Store.open(config.store.path)
    ids = TicketIds(config.tickets.prefix, config.hostname, config.support.reply_secret.encode())
    try:
        yield Desk(config, store, ids, Intake(config, store, ids))
    finally:
        await store.close()


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    async for opened in open_desk(tmp_path):
        yield opened


@pytest.fixture
async def normalizing_desk(tmp_path: Path) -> AsyncIterator[Desk]:
    async for opened in open_desk(tmp_path, limits="  bare_newlines: normalize\n"):
        yield opened


# --------------------------------------------------------------------------- new tickets


class TestNewTickets:
    async def test_new_messages_open_consecutive_tickets(self, desk: Desk) -> None:
        first = await desk.receive(message(message_id="<a@customer.example>"))
        second = await desk.receive(message("dave@other.example", "VPN down", message_id="<b@other.example>"),
                                    mail_from="dave@other.example")
        assert (first.ticket, first.number, first.duplicate, first.threaded_by) == ("SUP-1000", 1000, False, None)
        assert (second.ticket, second.number) == ("SUP-1001", 1001)

    async def test_the_ticket_records_subject_and_customer(self, desk: Desk) -> None:
        accepted = await desk.receive(message(subject="=?utf-8?q?Drucker_brennt?="))
        ticket = await desk.store.ticket(accepted.number or 0)
        assert ticket is not None
        assert (ticket.subject, ticket.customer, ticket.status) == ("Drucker brennt", CUSTOMER, "open")

    async def test_one_transaction_to_two_support_addresses_is_one_ticket(self, desk: Desk) -> None:
        accepted = await desk.receive(message(), rcpt_tos=(SUPPORT, "help@example.test"))
        assert accepted.ticket == "SUP-1000"
        assert await desk.count("tickets") == 1
        [stored] = await desk.store.messages(1000)
        assert stored.rcpt_to == (SUPPORT, "help@example.test")
        assert await desk.count("work") == 1

    async def test_mail_only_to_the_bounce_address_opens_no_ticket(self, desk: Desk) -> None:
        bounce = message("mailer-daemon@relay.example", "Undelivered Mail Returned to Sender")
        accepted = await desk.receive(bounce, mail_from="", rcpt_tos=(desk.config.support.bounce_address,))
        assert (accepted.ticket, accepted.number) == (None, None)
        assert await desk.count("tickets") == 0
        assert await desk.count("work") == 0
        row = await desk.store.fetchone("SELECT ticket, raw FROM messages")
        assert row is not None and row[0] is None and bytes(row[1]) == bounce
        kinds = [r[0] for r in await desk.store.fetchall("SELECT kind FROM events")]
        assert kinds == ["bounce_received"]

    async def test_the_accepted_message_is_stored_byte_for_byte(self, desk: Desk) -> None:
        data = message(body="caf\xe9 =?utf-8?q?not_decoded?=\r\n.\r\n..dots\r\n")
        accepted = await desk.receive(data)
        [stored] = await desk.store.messages(accepted.number or 0)
        assert await desk.store.message_raw(stored.id) == data
        assert stored.size == len(data)


# --------------------------------------------------------------------------- rule 1: signed Message-IDs


class TestSignedMessageIds:
    async def test_a_reply_to_a_gatewayd_message_id_threads_from_any_sender(self, desk: Desk) -> None:
        await desk.receive(message())
        reply = message(STRANGER, "Re: something else", in_reply_to=desk.ids.message_id(1000))
        accepted = await desk.receive(reply, mail_from=STRANGER)
        assert (accepted.ticket, accepted.threaded_by) == ("SUP-1000", "gatewayd-message-id")

    async def test_a_signed_id_deep_in_references_threads(self, desk: Desk) -> None:
        await desk.receive(message())
        refs = f"<x@elsewhere.example> {desk.ids.message_id(1000)} <y@elsewhere.example>"
        accepted = await desk.receive(message(STRANGER, "Fwd", references=refs), mail_from=STRANGER)
        assert (accepted.number, accepted.threaded_by) == (1000, "gatewayd-message-id")

    @pytest.mark.parametrize("tamper", ["mac", "ticket", "host"])
    async def test_a_forged_or_altered_signed_id_does_not_thread(self, desk: Desk, tamper: str) -> None:
        await desk.receive(message())
        await desk.receive(message("dave@other.example", "other"), mail_from="dave@other.example")
        genuine = desk.ids.message_id(1001)
        forged = {
            "mac": genuine[:-len("@gw.example.test>") - 1] + ("0" if genuine[-18] != "0" else "1")
            + "@gw.example.test>",
            "ticket": genuine.replace("SUP-1001.", "SUP-1000."),
            "host": genuine.replace("@gw.example.test", "@evil.example"),
        }[tamper]
        assert forged != genuine
        accepted = await desk.receive(message(STRANGER, "hello", in_reply_to=forged), mail_from=STRANGER)
        assert accepted.threaded_by is None
        assert accepted.number == 1002

    async def test_an_id_signed_with_another_secret_does_not_thread(self, desk: Desk) -> None:
        await desk.receive(message())
        other = TicketIds("SUP", "gw.example.test", b"someone-elses-secret")
        accepted = await desk.receive(message(STRANGER, "hi", in_reply_to=other.message_id(1000)),
                                      mail_from=STRANGER)
        assert accepted.number == 1001

    async def test_a_signed_id_in_folded_references_threads(self, desk: Desk) -> None:
        await desk.receive(message())
        refs = "<x@elsewhere.example>\r\n " + desk.ids.message_id(1000) + "\r\n\t<y@elsewhere.example>"
        accepted = await desk.receive(message(STRANGER, "Fwd", references=refs), mail_from=STRANGER)
        assert (accepted.number, accepted.threaded_by) == (1000, "gatewayd-message-id")

    async def test_a_signed_id_of_a_ticket_that_does_not_exist_opens_a_new_one(self, desk: Desk) -> None:
        accepted = await desk.receive(message(in_reply_to=desk.ids.message_id(4242)))
        assert (accepted.number, accepted.threaded_by) == (1000, None)


# --------------------------------------------------------------------------- rule 2: references


class TestReferences:
    async def test_a_reference_to_the_customers_message_threads_from_the_customer(self, desk: Desk) -> None:
        await desk.receive(message(message_id="<first@customer.example>"))
        followup = message(subject="more details", message_id="<second@customer.example>",
                           references="<first@customer.example>")
        accepted = await desk.receive(followup)
        assert (accepted.number, accepted.threaded_by) == (1000, "references")

    async def test_in_reply_to_a_stored_message_id_threads_from_the_customer(self, desk: Desk) -> None:
        await desk.receive(message(message_id="<first@customer.example>"))
        accepted = await desk.receive(message(in_reply_to="<first@customer.example>"))
        assert (accepted.number, accepted.threaded_by) == (1000, "references")

    async def test_a_reference_from_a_stranger_opens_a_new_ticket(self, desk: Desk) -> None:
        await desk.receive(message(message_id="<first@customer.example>"))
        accepted = await desk.receive(message(STRANGER, "Re: Printer on fire", references="<first@customer.example>"),
                                      mail_from=STRANGER)
        assert (accepted.number, accepted.threaded_by) == (1001, None)

    async def test_the_pseudo_reference_threads_from_a_participant(self, desk: Desk) -> None:
        await desk.receive(message())
        accepted = await desk.receive(message(subject="again", references="<SUP-1000@gw.example.test>"))
        assert (accepted.number, accepted.threaded_by) == (1000, "pseudo-reference")

    async def test_the_pseudo_reference_from_a_stranger_opens_a_new_ticket(self, desk: Desk) -> None:
        """The pseudo-reference carries no MAC: anyone can write it."""
        await desk.receive(message())
        accepted = await desk.receive(message(STRANGER, "again", in_reply_to="<SUP-1000@gw.example.test>"),
                                      mail_from=STRANGER)
        assert (accepted.number, accepted.threaded_by) == (1001, None)

    async def test_the_envelope_sender_counts_as_the_sender(self, desk: Desk) -> None:
        """A customer whose client writes a different From still threads by envelope sender."""
        await desk.receive(message(message_id="<first@customer.example>"))
        accepted = await desk.receive(message("carol.alias@customer.example", "x",
                                              references="<first@customer.example>"), mail_from=CUSTOMER)
        assert accepted.number == 1000


# --------------------------------------------------------------------------- rule 3: subject tags


class TestSubjectTags:
    async def test_the_tag_threads_a_message_from_the_customer(self, desk: Desk) -> None:
        await desk.receive(message())
        accepted = await desk.receive(message(subject="Re: [SUP-1000] Printer on fire"))
        assert (accepted.ticket, accepted.threaded_by) == ("SUP-1000", "subject-tag")

    async def test_the_tag_is_matched_whatever_the_sender_address_case(self, desk: Desk) -> None:
        await desk.receive(message())
        accepted = await desk.receive(message("Carol@Customer.Example", "[SUP-1000] update"),
                                      mail_from="Carol@Customer.Example")
        assert accepted.number == 1000

    @pytest.mark.parametrize("subject", [
        "=?utf-8?q?Re=3A_=5BSUP-1000=5D_Caf=C3=A9_au_lait?=",
        "=?utf-8?b?UmU6IFtTVVAtMTAwMF0gQ2Fmw6kgYXUgbGFpdA==?=",
        "Re: [SUP-1000] =?utf-8?q?Caf=C3=A9?= au lait",
    ], ids=["q-encoded", "b-encoded", "tag-outside"])
    async def test_a_tag_inside_an_encoded_subject_threads(self, desk: Desk, subject: str) -> None:
        """Mail clients encode a whole non-ASCII subject, tag and all."""
        await desk.receive(message())
        accepted = await desk.receive(message(subject=subject))
        assert (accepted.number, accepted.threaded_by) == (1000, "subject-tag")

    async def test_a_stranger_using_someone_elses_tag_opens_a_new_ticket(self, desk: Desk) -> None:
        await desk.receive(message())
        accepted = await desk.receive(message(STRANGER, "[SUP-1000] please send me the invoice"),
                                      mail_from=STRANGER)
        assert (accepted.ticket, accepted.threaded_by) == ("SUP-1001", None)
        assert [m.mail_from for m in await desk.store.messages(1000)] == [CUSTOMER]
        rows = await desk.store.fetchall("SELECT address FROM participants WHERE ticket = 1000")
        assert [r[0] for r in rows] == [CUSTOMER]

    async def test_the_same_subject_without_a_tag_never_threads(self, desk: Desk) -> None:
        await desk.receive(message(subject="Printer on fire", message_id="<one@customer.example>"))
        accepted = await desk.receive(message(subject="Printer on fire", message_id="<two@customer.example>"))
        again = await desk.receive(message(subject="Re: Printer on fire", body="still burning\r\n"))
        assert [accepted.number, again.number] == [1001, 1002]
        assert accepted.threaded_by is None and again.threaded_by is None

    async def test_first_match_wins_signed_id_over_subject_tag(self, desk: Desk) -> None:
        await desk.receive(message())                                                   # A: SUP-1000
        await desk.receive(message(subject="second problem", body="other\r\n"))        # B: SUP-1001
        both = message(subject="[SUP-1001] both", in_reply_to=desk.ids.message_id(1000))
        accepted = await desk.receive(both)
        assert (accepted.number, accepted.threaded_by) == (1000, "gatewayd-message-id")

    async def test_a_threaded_stranger_becomes_a_participant(self, desk: Desk) -> None:
        """Someone brought in by a reply to gatewayd's own message may then use the tag."""
        await desk.receive(message())
        await desk.receive(message(STRANGER, "Re: x", in_reply_to=desk.ids.message_id(1000)), mail_from=STRANGER)
        accepted = await desk.receive(message(STRANGER, "[SUP-1000] one more thing"), mail_from=STRANGER)
        assert (accepted.number, accepted.threaded_by) == (1000, "subject-tag")


# --------------------------------------------------------------------------- duplicates


class TestDuplicateDelivery:
    async def test_the_same_message_delivered_twice_is_one_message_and_one_route(self, desk: Desk) -> None:
        data = message(message_id="<retry@customer.example>")
        first = await desk.receive(data)
        again = await desk.receive(data)
        assert (again.ticket, again.duplicate) == (first.ticket, True)
        assert first.duplicate is False
        assert await desk.count("messages") == 1
        assert await desk.count("tickets") == 1
        work = await desk.store.fetchall("SELECT kind, ticket FROM work")
        assert [tuple(w) for w in work] == [("route", 1000)]

    async def test_two_deliveries_of_the_same_message_at_once_make_one_ticket(self, desk: Desk) -> None:
        """An impatient upstream may retry while the first attempt is still committing."""
        data = message(message_id="<race@customer.example>")
        results = await asyncio.gather(desk.receive(data), desk.receive(data))
        assert {r.number for r in results} == {1000}
        assert sorted(r.duplicate for r in results) == [False, True]
        assert await desk.count("messages") == 1

    async def test_a_duplicate_is_recorded_as_an_event(self, desk: Desk) -> None:
        data = message(message_id="<retry@customer.example>")
        await desk.receive(data)
        await desk.receive(data)
        assert [e.kind for e in await desk.store.events(1000)] == ["message_received", "duplicate_received"]

    async def test_the_same_message_id_from_another_sender_is_another_message(self, desk: Desk) -> None:
        data = message(message_id="<shared@customer.example>")
        first = await desk.receive(data)
        other = await desk.receive(data, mail_from="list-owner@lists.example")
        assert other.duplicate is False
        assert other.number != first.number
        assert await desk.count("messages") == 2

    async def test_the_same_message_id_with_other_bytes_is_another_message(self, desk: Desk) -> None:
        await desk.receive(message(message_id="<same@customer.example>", body="one\r\n"))
        other = await desk.receive(message(message_id="<same@customer.example>", body="two\r\n"))
        assert other.duplicate is False
        assert await desk.count("messages") == 2

    async def test_a_duplicate_of_a_threaded_followup_keeps_its_ticket(self, desk: Desk) -> None:
        await desk.receive(message())
        followup = message(subject="[SUP-1000] more", message_id="<f@customer.example>")
        first = await desk.receive(followup)
        again = await desk.receive(followup)
        assert (first.number, again.number, again.duplicate) == (1000, 1000, True)
        assert await desk.count("work") == 2


# --------------------------------------------------------------------------- events


class TestEvents:
    async def test_received_and_followup_events_are_written(self, desk: Desk) -> None:
        await desk.receive(message(message_id="<a@customer.example>"))
        await desk.receive(message(subject="[SUP-1000] more", message_id="<b@customer.example>"))
        events = await desk.store.events(1000)
        assert [e.kind for e in events] == ["message_received", "followup_received"]
        assert events[0].detail["message_id"] == "<a@customer.example>"
        assert events[0].detail["mail_from"] == CUSTOMER
        assert events[0].detail["listener"] == "smtp"
        assert events[0].detail["threaded_by"] is None
        assert events[1].detail["threaded_by"] == "subject-tag"


# --------------------------------------------------------------------------- refusals


class TestRefusals:
    @pytest.mark.parametrize("payload", [
        b"line one\nline two\r\n",
        b"line one\rline two\r\n",
        b"smuggled\r\n.\nMAIL FROM:<x@evil.test>\r\n",
        b"smuggled\r\n.\r\rMAIL FROM:<x@evil.test>\r\n",
        b"nul \x00 byte\r\n",
    ], ids=["bare-lf", "bare-cr", "lf-dot", "cr-dot", "nul"])
    async def test_bare_newlines_and_nul_are_refused(self, desk: Desk, payload: bytes) -> None:
        data = message().replace(b"It started smoking this morning.\r\n", payload)
        with pytest.raises(Refused) as caught:
            await desk.receive(data)
        assert caught.value.reply.startswith("550 5.6.0 ")
        assert await desk.count("messages") == 0
        assert await desk.count("tickets") == 0

    async def test_a_bare_lf_in_the_headers_is_refused_too(self, desk: Desk) -> None:
        with pytest.raises(Refused, match="^550 5.6.0"):
            await desk.receive(message().replace(b"\r\nSubject:", b"\nSubject:"))

    async def test_normalize_mode_stores_crlf_only(self, normalizing_desk: Desk) -> None:
        data = message().replace(b"It started smoking this morning.\r\n", b"one\ntwo\rthree\x00\r\n")
        accepted = await normalizing_desk.receive(data)
        [stored] = await normalizing_desk.store.messages(accepted.number or 0)
        raw = await normalizing_desk.store.message_raw(stored.id)
        assert raw.endswith(b"\r\n\r\none\r\ntwo\r\nthree\r\n")
        assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
        assert b"\x00" not in raw

    async def test_a_header_block_over_the_limit_is_refused(self, desk: Desk) -> None:
        limit = desk.config.limits.max_header_size
        padding = "".join(f"X-Padding-{n}: {'p' * 900}\r\n" for n in range(limit // 900 + 2))
        with pytest.raises(Refused, match=r"^552 5\.3\.4 "):
            await desk.receive(message(extra=padding))
        assert await desk.count("messages") == 0

    async def test_a_headers_only_message_over_the_limit_is_refused(self, desk: Desk) -> None:
        limit = desk.config.limits.max_header_size
        data = b"Subject: x\r\n" + b"".join(b"X-P: " + b"p" * 900 + b"\r\n" for _ in range(limit // 900 + 2))
        with pytest.raises(Refused, match=r"^552 5\.3\.4 "):
            await desk.receive(data)

    async def test_a_header_block_just_under_the_limit_is_accepted(self, desk: Desk) -> None:
        limit = desk.config.limits.max_header_size
        base = len(message().split(b"\r\n\r\n")[0]) + 2
        filler = limit - base - len("X-Padding: \r\n") - 10
        accepted = await desk.receive(message(extra=f"X-Padding: {'p' * 900}\r\n" * (filler // 913)))
        assert accepted.number == 1000

    async def test_a_large_body_is_not_a_large_header(self, desk: Desk) -> None:
        accepted = await desk.receive(message(body=("body line\r\n" * 30_000)))
        assert accepted.number == 1000

    async def test_more_than_50_received_headers_is_a_loop(self, desk: Desk) -> None:
        hops = "".join(f"Received: from hop{n}.example by relay.example; Mon, 1 Jan 2024 10:00:00 +0000\r\n"
                       for n in range(51))
        with pytest.raises(Refused, match=r"^554 5\.4\.6 "):
            await desk.receive(message(extra=hops))
        assert await desk.count("messages") == 0

    async def test_50_received_headers_are_fine(self, desk: Desk) -> None:
        hops = "".join(f"Received: from hop{n}.example by relay.example\r\n" for n in range(50))
        assert (await desk.receive(message(extra=hops))).number == 1000

    async def test_our_own_trace_header_twice_is_a_loop(self, desk: Desk) -> None:
        with pytest.raises(Refused, match=r"^554 5\.4\.6 "):
            await desk.receive(message(extra="X-Gatewayd-Ticket: SUP-1000\r\nX-Gatewayd-Ticket: SUP-1000\r\n"))

    async def test_our_own_trace_header_once_is_fine(self, desk: Desk) -> None:
        accepted = await desk.receive(message(extra="X-Gatewayd-Ticket: SUP-7\r\n"))
        assert accepted.number == 1000
