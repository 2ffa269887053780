"""DMARC (DKIM-only alignment): pass / fail / none / temperror, the reject policy, receipts, the header."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from gatewayd.config import DnsConfig, Endpoint
from gatewayd.dkim import CachingResolver, DnsTemporaryError, Signer, Verdict, Verifier, verify_blocking
from gatewayd.dmarc import DmarcResult, aligned, evaluate, parse_record
from tests.autoreply.conftest import autoreply_yaml, forwards, outcome, receipts, settle
from tests.autoreply.test_dkim import CUSTOMER_RECORD, SELECTOR, top_auth_results
from tests.support.smtp import message, send_message

DMARC_RECORD = "_dmarc.customer.test."
OTHER_RECORD = f"{SELECTOR}._domainkey.other.test."


def signed_by(raw: bytes, key, domain: str = "customer.test") -> bytes:
    return Signer(domain, SELECTOR, "rsa-sha256", key.private).sign(raw)


def dns_yaml(port: int, timeout: str = "1s", unauthenticated: str = "accept") -> str:
    return (f'dns: {{resolver: "127.0.0.1:{port}", timeout: {timeout}}}\n'
            f"authentication: {{unauthenticated: {unauthenticated}}}\n")


def broken(name: bytes, timeout: float = 5) -> bytes:
    raise DnsTemporaryError("LifetimeTimeout")


class TestRecordAndAlignment:
    def test_parse_record(self) -> None:
        record = parse_record(b"v=DMARC1; p=reject; sp=quarantine; adkim=s; rua=mailto:d@customer.test")
        assert (record.policy, record.subdomain_policy, record.adkim) == ("reject", "quarantine", "s")
        assert parse_record("v=DMARC1;p=bogus").policy == "none"
        assert parse_record("v=DMARC1; p=quarantine").adkim == "r"
        assert parse_record("p=reject; v=DMARC1") is None
        assert parse_record("v=spf1 -all") is None
        assert parse_record(None) is None

    def test_alignment(self) -> None:
        assert aligned("customer.test", "customer.test", "s")
        assert not aligned("customer.test", "mail.customer.test", "s")
        assert aligned("customer.test", "mail.customer.test", "r")
        assert aligned("mail.customer.test", "customer.test", "r")
        assert not aligned("notcustomer.test", "customer.test", "r")
        # No Public Suffix List: siblings are not aligned, so d=evil.co.uk never passes for bank.co.uk.
        assert not aligned("evil.co.uk", "bank.co.uk", "r")
        assert not aligned("a.customer.test", "b.customer.test", "r")
        assert not aligned("test", "customer.test", "r")


class TestEvaluate:
    """The verdicts with the stub dnsfunc (no sockets)."""

    def verdict(self, raw: bytes, records: dict[str, str], stub_dnsfunc) -> DmarcResult:
        dnsfunc = stub_dnsfunc(records)
        return evaluate(raw, verify_blocking(raw, dnsfunc, 1).pass_domains, dnsfunc, 1)

    def test_aligned_pass(self, rsa_key, stub_dnsfunc) -> None:
        result = self.verdict(signed_by(message(), rsa_key), {CUSTOMER_RECORD: rsa_key.txt,
                                                              DMARC_RECORD: "v=DMARC1; p=reject"}, stub_dnsfunc)
        assert (result.result, result.domain, result.policy, result.enforced_fail) == \
            ("pass", "customer.test", "reject", False)

    def test_unaligned_signature_fails(self, rsa_key, stub_dnsfunc) -> None:
        result = self.verdict(signed_by(message(), rsa_key, "other.test"),
                              {OTHER_RECORD: rsa_key.txt, DMARC_RECORD: "v=DMARC1; p=reject"}, stub_dnsfunc)
        assert (result.result, result.policy, result.enforced_fail) == ("fail", "reject", True)

    def test_a_broken_aligned_signature_fails(self, rsa_key, stub_dnsfunc) -> None:
        tampered = signed_by(message(), rsa_key).replace(b"Please help.", b"Please pay.")
        result = self.verdict(tampered, {CUSTOMER_RECORD: rsa_key.txt, DMARC_RECORD: "v=DMARC1; p=quarantine"},
                              stub_dnsfunc)
        assert (result.result, result.enforced_fail) == ("fail", True)

    def test_unsigned_with_policy_fails_and_p_none_is_not_enforced(self, stub_dnsfunc) -> None:
        assert self.verdict(message(), {DMARC_RECORD: "v=DMARC1; p=reject"}, stub_dnsfunc).enforced_fail
        result = self.verdict(message(), {DMARC_RECORD: "v=DMARC1; p=none"}, stub_dnsfunc)
        assert (result.result, result.enforced_fail) == ("fail", False)

    def test_no_record_is_none(self, rsa_key, stub_dnsfunc) -> None:
        assert self.verdict(message(), {}, stub_dnsfunc).result == "none"
        assert self.verdict(signed_by(message(), rsa_key, "other.test"), {OTHER_RECORD: rsa_key.txt},
                            stub_dnsfunc).result == "none"

    def test_dns_error_is_temperror(self) -> None:
        result = evaluate(message(), frozenset(), broken, 1)
        assert (result.result, result.domain, result.enforced_fail) == ("temperror", "customer.test", False)

    def test_subdomain_falls_back_to_the_parent_record_and_its_sp(self, rsa_key, stub_dnsfunc) -> None:
        raw = message(sender="carol@mail.customer.test")
        records = {CUSTOMER_RECORD: rsa_key.txt, DMARC_RECORD: "v=DMARC1; p=none; sp=reject"}
        unsigned = self.verdict(raw, records, stub_dnsfunc)
        assert (unsigned.result, unsigned.domain, unsigned.policy) == ("fail", "mail.customer.test", "reject")
        assert self.verdict(signed_by(raw, rsa_key), records, stub_dnsfunc).result == "pass"
        strict = {**records, DMARC_RECORD: "v=DMARC1; p=reject; adkim=s"}
        assert self.verdict(signed_by(raw, rsa_key), strict, stub_dnsfunc).result == "fail"

    def test_no_single_from_is_permerror_and_not_enforced(self, stub_dnsfunc) -> None:
        raw = message(extra="From: mallory@evil.test\r\n")
        result = self.verdict(raw, {DMARC_RECORD: "v=DMARC1; p=reject"}, stub_dnsfunc)
        assert (result.result, result.enforced_fail) == ("permerror", False)

    async def test_verifier_checks_dmarc_for_unsigned_mail_too(self, stub_dnsfunc) -> None:
        verdict = await Verifier(stub_dnsfunc({DMARC_RECORD: "v=DMARC1; p=reject"}), timeout=1).check(message())
        assert verdict.verdict == "none" and not verdict.failed
        assert verdict.dmarc.result == "fail" and verdict.unauthenticated
        assert verdict.header_value("gw.example.test") == \
            "gw.example.test; dkim=none; dmarc=fail (p=reject no aligned DKIM signature) header.from=customer.test"


class TestStoredVerdict:
    def test_round_trip(self) -> None:
        verdict = Verdict((), "none", "", DmarcResult("fail", "customer.test", "reject", "no aligned DKIM signature"))
        assert Verdict.from_json(json.loads(json.dumps(verdict.to_json()))) == verdict

    @pytest.mark.parametrize("dkim", ["pass", "fail", "none"])
    def test_rows_from_before_dmarc_still_read(self, dkim) -> None:
        old = {"verdict": dkim, "detail": "", "results": []}
        verdict = Verdict.from_json(old)
        assert verdict.dmarc is None and verdict.unauthenticated == (dkim == "fail")
        assert "dmarc" not in verdict.header_value("gw.example.test")
        assert verdict.to_json() == old


class TestEndToEnd:
    """Through the listener, with DNS answered by the loopback stub server."""

    async def forward_of(self, gw, raw: bytes) -> bytes:
        [reply] = await send_message(gw.smtp_port, raw)
        assert reply.code == 250, reply
        [forward] = await gw.sink.wait_for(1)
        return forward.content

    async def stored_auth(self, gw) -> dict:
        async def read(tx):
            return await tx.fetchone("SELECT auth FROM messages ORDER BY id LIMIT 1")
        return json.loads((await gw.store.transact(read))[0])

    async def test_aligned_pass_is_recorded_and_on_the_forward(self, gateway_factory, dns_stub, rsa_key) -> None:
        stub, port = dns_stub
        stub.records.update({CUSTOMER_RECORD: rsa_key.txt, DMARC_RECORD: "v=DMARC1; p=reject"})
        gw = await gateway_factory(extra=dns_yaml(port, unauthenticated="reject"))
        content = await self.forward_of(gw, signed_by(message(), rsa_key))
        [ours] = top_auth_results(content)
        assert ours.startswith("gw.example.test; dkim=pass header.d=customer.test")
        assert ours.endswith("; dmarc=pass (p=reject) header.from=customer.test")
        assert content.startswith(b"Authentication-Results: gw.example.test;\r\n dkim=pass header.d=customer.test ")
        assert b";\r\n dmarc=pass (p=reject) header.from=customer.test\r\n" in content
        auth = await self.stored_auth(gw)
        assert auth["dmarc"] == {"result": "pass", "domain": "customer.test", "policy": "reject", "reason": ""}
        assert "dmarc=pass" in auth["header"]

    async def test_unaligned_signature_with_p_reject_is_refused_at_data(self, gateway_factory, dns_stub,
                                                                        rsa_key) -> None:
        stub, port = dns_stub
        stub.records.update({OTHER_RECORD: rsa_key.txt, DMARC_RECORD: "v=DMARC1; p=reject"})
        gw = await gateway_factory(extra=dns_yaml(port, unauthenticated="reject"))
        spoofed = signed_by(message(), rsa_key, "other.test")
        [reply] = await send_message(gw.smtp_port, spoofed)
        assert reply.code == 550 and reply.text.startswith("5.7.1") and "DMARC" in reply.text
        replies = await send_message(gw.lmtp_port, spoofed, lmtp=True,
                                     rcpts=("support@example.test", "help@example.test"))
        assert [r.code for r in replies] == [550, 550]
        assert await gw.store.tickets() == []

    async def test_unaligned_signature_is_fail_on_the_forward_under_accept(self, gateway_factory, dns_stub,
                                                                           rsa_key) -> None:
        stub, port = dns_stub
        stub.records.update({OTHER_RECORD: rsa_key.txt, DMARC_RECORD: "v=DMARC1; p=reject"})
        gw = await gateway_factory(extra=dns_yaml(port))
        content = await self.forward_of(gw, signed_by(message(), rsa_key, "other.test"))
        [ours] = top_auth_results(content)
        assert "dkim=pass header.d=other.test" in ours
        assert ours.endswith("dmarc=fail (p=reject no aligned DKIM signature) header.from=customer.test")

    async def test_answers_are_cached_for_their_ttl(self, gateway_factory, dns_stub) -> None:
        """Every message from a domain needs the same records: one lookup each, not one per message."""
        stub, port = dns_stub
        stub.negative_ttl = 300
        stub.records[DMARC_RECORD] = "v=DMARC1; p=none"
        gw = await gateway_factory(extra=dns_yaml(port))
        for n in range(3):
            [reply] = await send_message(gw.smtp_port, message(subject=f"cached {n}", message_id=f"<c{n}@c.test>"))
            assert reply.code == 250
        other = message("other domain", sender="dave@elsewhere.test", message_id="<o@elsewhere.test>")
        for _ in range(2):
            [reply] = await send_message(gw.smtp_port, other)
            assert reply.code == 250
        assert sorted(stub.queries) == ["_dmarc.customer.test.", "_dmarc.elsewhere.test."]

    @pytest.mark.parametrize("record", ["v=DMARC1; p=reject", None])
    async def test_an_unsigned_message_whose_records_are_cached_needs_no_worker_thread(self, dns_stub,
                                                                                      record) -> None:
        stub, port = dns_stub
        stub.negative_ttl = 300
        if record:
            stub.records[DMARC_RECORD] = record
        resolver = CachingResolver(DnsConfig(resolver=Endpoint(host="127.0.0.1", port=port), timeout=1.0))
        first = await Verifier(resolver, timeout=1).check(message())
        asked = list(stub.queries)

        class NoThreads(ThreadPoolExecutor):
            def submit(self, *args, **kwargs):
                raise AssertionError("went to a worker thread")

        second = await Verifier(resolver, timeout=1, executor=NoThreads()).check(message())
        assert second == first and second.dmarc.result == ("fail" if record else "none")
        assert stub.queries == asked

    async def test_p_none_fail_is_accepted_under_reject(self, gateway_factory, dns_stub) -> None:
        stub, port = dns_stub
        stub.records[DMARC_RECORD] = "v=DMARC1; p=none"
        gw = await gateway_factory(extra=dns_yaml(port, unauthenticated="reject"))
        content = await self.forward_of(gw, message())
        assert top_auth_results(content) == [
            "gw.example.test; dkim=none; dmarc=fail (p=none no aligned DKIM signature) header.from=customer.test"]

    async def test_no_record_is_none(self, gateway_factory, dns_stub) -> None:
        stub, port = dns_stub
        gw = await gateway_factory(extra=dns_yaml(port, unauthenticated="reject"))
        content = await self.forward_of(gw, message(sender="carol@mail.customer.test"))
        assert top_auth_results(content) == ["gw.example.test; dkim=none; dmarc=none header.from=mail.customer.test"]
        assert stub.queries == ["_dmarc.mail.customer.test.", DMARC_RECORD]
        assert (await self.stored_auth(gw))["dmarc"]["result"] == "none"

    async def test_dns_error_is_temperror_and_the_message_is_accepted(self, gateway_factory) -> None:
        from tests.support.gateway import free_port

        gw = await gateway_factory(extra=dns_yaml(free_port(), timeout="0.3s", unauthenticated="reject"))
        content = await self.forward_of(gw, message())
        [ours] = top_auth_results(content)
        assert ours.startswith("gw.example.test; dkim=none; dmarc=temperror (DNS")
        assert ours.endswith("header.from=customer.test")
        assert (await self.stored_auth(gw))["dmarc"]["result"] == "temperror"

    async def test_dmarc_fail_with_quarantine_withholds_the_receipt(self, gateway_factory, dns_stub) -> None:
        stub, port = dns_stub
        stub.records[DMARC_RECORD] = "v=DMARC1; p=quarantine"
        gw = await gateway_factory(extra=autoreply_yaml(dns_port=port, unauthenticated="no_receipt"))
        assert (await send_message(gw.smtp_port, message()))[0].code == 250
        assert (await outcome(gw.store, 1000)).detail["reason"] == "unauthenticated"
        await settle(gw.sink, 1)
        assert len(forwards(gw.sink)) == 1 and receipts(gw.sink) == []

    async def test_dmarc_pass_still_gets_a_receipt(self, gateway_factory, dns_stub, rsa_key) -> None:
        stub, port = dns_stub
        stub.records.update({CUSTOMER_RECORD: rsa_key.txt, DMARC_RECORD: "v=DMARC1; p=quarantine"})
        gw = await gateway_factory(extra=autoreply_yaml(dns_port=port, unauthenticated="no_receipt"))
        assert (await send_message(gw.smtp_port, signed_by(message(), rsa_key)))[0].code == 250
        assert (await outcome(gw.store, 1000)).kind == "receipt_queued"
        await settle(gw.sink, 2)
        assert len(receipts(gw.sink)) == 1
