"""DKIM: receipts signed and verifiable, keygen, inbound pass / fail / none / temperror, forged results."""

from __future__ import annotations

import asyncio

import re
from pathlib import Path

import dkim
import pytest

from gatewayd import cli
from gatewayd.dkim import GeneratedKey, Signer, Verifier, load_private_key, verify_blocking
from gatewayd.rawmessage import fields, header_block
from tests.autoreply.conftest import autoreply_yaml, forwards, outcome, receipts, settle
from tests.support.smtp import message, send_message

SELECTOR = "sel"
CUSTOMER_RECORD = f"{SELECTOR}._domainkey.customer.test."


def sign_inbound(raw: bytes, key: GeneratedKey, domain: str = "customer.test") -> bytes:
    return Signer(domain, SELECTOR, "rsa-sha256", key.private).sign(raw)


def signature_tags(data: bytes) -> dict[str, str]:
    block = header_block(data)
    [value] = [f.value for f in fields(block) if f.name == "dkim-signature"]
    return {k.strip(): v.strip() for k, _, v in (t.partition("=") for t in re.sub(r"\s+", "", value).split(";"))
            if k.strip()}


def dkim_yaml(tmp_path: Path, key: GeneratedKey, algorithm: str = "rsa-sha256") -> str:
    path = tmp_path / f"{algorithm}.key"
    path.write_bytes(key.private)
    return f"dkim: {{domain: example.test, selector: gw, key_file: \"{path}\", algorithm: {algorithm}}}\n"


def top_auth_results(data: bytes) -> list[str]:
    block = header_block(data)
    return [f.value for f in fields(block) if f.name == "authentication-results"]


class TestSigning:
    @pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
    async def test_receipts_are_signed_and_verify_with_the_published_key(
            self, gateway_factory, tmp_path, stub_dnsfunc, rsa_key, ed25519_key, algorithm) -> None:
        key = rsa_key if algorithm == "rsa-sha256" else ed25519_key
        gw = await gateway_factory(extra=autoreply_yaml(dkim=dkim_yaml(tmp_path, key, algorithm)))
        assert (await send_message(gw.smtp_port, message()))[0].code == 250
        assert (await outcome(gw.store, 1000)).detail["signed"] is True
        await settle(gw.sink, 2)
        [receipt] = receipts(gw.sink)
        dnsfunc = stub_dnsfunc({"gw._domainkey.example.test.": key.txt})
        assert dkim.verify(receipt.content, dnsfunc=dnsfunc)
        tags = signature_tags(receipt.content)
        assert tags["a"] == algorithm and tags["c"] == "relaxed/relaxed" and tags["d"] == "example.test"
        assert "l" not in tags
        assert tags["h"].split(":").count("from") == 2

    def test_a_second_from_added_later_breaks_the_signature(self, rsa_key, stub_dnsfunc) -> None:
        signed = Signer("example.test", "gw", "rsa-sha256", rsa_key.private).sign(
            b"From: support@example.test\r\nTo: c@customer.test\r\nSubject: hi\r\n\r\nbody\r\n")
        forged = b"From: ceo@example.test\r\n" + signed
        dnsfunc = stub_dnsfunc({"gw._domainkey.example.test.": rsa_key.txt})
        assert dkim.verify(signed, dnsfunc=dnsfunc)
        assert not dkim.verify(forged, dnsfunc=dnsfunc)


class TestKeygen:
    @pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
    def test_writes_a_usable_key_and_prints_the_record(self, tmp_path, capsys, stub_dnsfunc, algorithm) -> None:
        path = tmp_path / "dkim.key"
        assert cli.main(["dkim", "keygen", "--domain", "example.test", "--selector", "gw",
                         "--algorithm", algorithm, "--bits", "1024", str(path)]) == 0
        assert path.stat().st_mode & 0o777 == 0o600
        out = capsys.readouterr().out
        record = re.search(r'gw\._domainkey\.example\.test\. IN TXT \( (.*) \)', out)
        assert record is not None
        txt = "".join(re.findall(r'"([^"]*)"', record.group(1)))
        assert txt.startswith("v=DKIM1; k=" + ("rsa" if algorithm == "rsa-sha256" else "ed25519"))
        key = load_private_key(path, algorithm)
        signed = Signer("example.test", "gw", algorithm, key).sign(b"From: a@example.test\r\n\r\nhi\r\n")
        assert dkim.verify(signed, dnsfunc=stub_dnsfunc({"gw._domainkey.example.test.": txt}))

    def test_never_overwrites_a_key(self, tmp_path, capsys) -> None:
        path = tmp_path / "dkim.key"
        path.write_bytes(b"precious")
        assert cli.main(["dkim", "keygen", "--domain", "example.test", "--selector", "gw", str(path)]) == 1
        assert path.read_bytes() == b"precious"

    def test_a_missing_or_broken_key_is_a_located_config_error(self, tmp_path) -> None:
        from gatewayd import config as config_module
        from gatewayd.errors import ConfigError

        broken = tmp_path / "broken.key"
        broken.write_text("not a key")
        base = "hostname: gw.example.test\nsupport: {addresses: [s@example.test], reply_secret: 12345678}\n" \
               "relay: {address: '127.0.0.1:25'}\nteams: [{name: t, supervisor: l@example.test}]\n" \
               "agents: [{name: a, address: a@example.test, teams: [t]}]\nlisteners: [{protocol: smtp, " \
               "address: '127.0.0.1:2525'}]\n"
        for key_file, text in ((tmp_path / "missing.key", "does not exist"), (broken, "not a PEM RSA")):
            with pytest.raises(ConfigError) as caught:
                config_module.loads(base + f"dkim: {{domain: example.test, selector: gw, key_file: '{key_file}'}}\n")
            [issue] = caught.value.issues
            assert issue.path == "dkim.key_file" and issue.line == 7 and text in issue.message


class TestVerifier:
    """The verdicts themselves, with a stub dnsfunc (no sockets)."""

    def test_pass_fail_none(self, rsa_key, stub_dnsfunc) -> None:
        dnsfunc = stub_dnsfunc({CUSTOMER_RECORD: rsa_key.txt})
        signed = sign_inbound(message(), rsa_key)
        assert verify_blocking(signed, dnsfunc, 1).verdict == "pass"
        assert verify_blocking(signed.replace(b"Please help.", b"Please pay."), dnsfunc, 1).verdict == "fail"
        assert verify_blocking(message(), dnsfunc, 1).verdict == "none"
        assert verify_blocking(signed, stub_dnsfunc({}), 1).verdict == "fail"

    def test_dns_failure_is_temperror(self, rsa_key) -> None:
        from gatewayd.dkim import DnsTemporaryError

        def broken(name: bytes, timeout: float = 5) -> bytes:
            raise DnsTemporaryError("LifetimeTimeout")
        verdict = verify_blocking(sign_inbound(message(), rsa_key), broken, 1)
        assert verdict.verdict == "temperror" and not verdict.failed

    async def test_a_hanging_lookup_is_cut_off_by_the_deadline(self, rsa_key) -> None:
        import threading

        release = threading.Event()

        def hang(name: bytes, timeout: float = 5) -> bytes | None:
            release.wait(5)
            return None
        verdict = await Verifier(hang, timeout=0.1, deadline=0.2).check(sign_inbound(message(), rsa_key))
        release.set()
        assert verdict.verdict == "temperror"

    def test_hostile_d_and_s_tags_never_reach_the_header(self, rsa_key, stub_dnsfunc) -> None:
        signed = sign_inbound(message(), rsa_key).replace(b"d=customer.test", b"d=x.test;\r\n\tBcc: v@evil.test")
        verdict = verify_blocking(signed, stub_dnsfunc({}), 1)
        value = verdict.header_value("gw.example.test")
        assert "evil" not in value and "\n" not in value.replace("\r\n ", "")


class TestInboundEndToEnd:
    """Through the listener, with DNS answered by a loopback stub server."""

    async def forward_of(self, gw, raw: bytes, mail_from: str = "carol@customer.test") -> bytes:
        [reply] = await send_message(gw.smtp_port, raw, mail_from=mail_from)
        assert reply.code == 250, reply
        [forward] = await gw.sink.wait_for(1)
        return forward.content

    async def test_pass_is_recorded_and_prepended(self, gateway_factory, dns_stub, rsa_key) -> None:
        stub, port = dns_stub
        stub.records[CUSTOMER_RECORD] = rsa_key.txt
        gw = await gateway_factory(extra=f'dns: {{resolver: "127.0.0.1:{port}", timeout: 1s}}\n')
        content = await self.forward_of(gw, sign_inbound(message(), rsa_key))
        assert content.startswith(b"Authentication-Results: gw.example.test;\r\n dkim=pass header.d=customer.test "
                                  b"header.s=sel header.b=")
        events = await gw.store.events(1000)
        assert events[0].detail["dkim"] == "pass"
        assert stub.queries == [CUSTOMER_RECORD, "_dmarc.customer.test."]

    async def test_fail(self, gateway_factory, dns_stub, rsa_key) -> None:
        stub, port = dns_stub
        stub.records[CUSTOMER_RECORD] = rsa_key.txt
        gw = await gateway_factory(extra=f'dns: {{resolver: "127.0.0.1:{port}", timeout: 1s}}\n')
        tampered = sign_inbound(message(), rsa_key).replace(b"Please help.", b"Please pay.")
        content = await self.forward_of(gw, tampered)
        assert top_auth_results(content)[0].startswith("gw.example.test; dkim=fail")

    async def test_no_signature_means_no_key_lookup(self, gateway_factory, dns_stub) -> None:
        stub, port = dns_stub
        gw = await gateway_factory(extra=f'dns: {{resolver: "127.0.0.1:{port}", timeout: 1s}}\n')
        content = await self.forward_of(gw, message())
        assert top_auth_results(content) == ["gw.example.test; dkim=none; dmarc=none header.from=customer.test"]
        assert stub.queries == ["_dmarc.customer.test."]

    async def test_dns_timeout_is_temperror_and_the_message_is_kept(self, gateway_factory, rsa_key) -> None:
        from tests.support.gateway import free_port

        silent = free_port()
        gw = await gateway_factory(extra=f'dns: {{resolver: "127.0.0.1:{silent}", timeout: 0.3s}}\n'
                                         "authentication: {unauthenticated: reject}\n")
        content = await self.forward_of(gw, sign_inbound(message(), rsa_key))
        assert top_auth_results(content)[0].startswith("gw.example.test; dkim=temperror")

    async def test_forged_results_for_our_authserv_id_are_removed(self, gateway_factory, dns_stub) -> None:
        stub, port = dns_stub
        gw = await gateway_factory(extra=f'dns: {{resolver: "127.0.0.1:{port}", timeout: 1s}}\n')
        forged = ("Authentication-Results: gw.example.test; dkim=pass header.d=bank.test\r\n"
                  "Authentication-Results: GW.EXAMPLE.TEST;\r\n dkim=pass\r\n header.d=bank.test\r\n"
                  "Authentication-Results: mx.customer.test; spf=pass smtp.mailfrom=customer.test\r\n")
        content = await self.forward_of(gw, message(extra=forged))
        assert top_auth_results(content) == ["gw.example.test; dkim=none; dmarc=none header.from=customer.test",
                                             "mx.customer.test; spf=pass smtp.mailfrom=customer.test"]
        assert b"bank.test" not in content
        stored = await gw.store.message_raw(1)
        assert stored == message(extra=forged)

    async def test_reject_policy_answers_550_at_data(self, gateway_factory, dns_stub, rsa_key) -> None:
        stub, port = dns_stub
        stub.records[CUSTOMER_RECORD] = rsa_key.txt
        gw = await gateway_factory(extra=f'dns: {{resolver: "127.0.0.1:{port}", timeout: 1s}}\n'
                                         "authentication: {unauthenticated: reject}\n")
        tampered = sign_inbound(message(), rsa_key).replace(b"Please help.", b"Please pay.")
        [reply] = await send_message(gw.smtp_port, tampered)
        assert reply.code == 550 and reply.text.startswith("5.7.1")
        replies = await send_message(gw.lmtp_port, tampered, lmtp=True,
                                     rcpts=("support@example.test", "help@example.test"))
        assert [r.code for r in replies] == [550, 550]
        assert await gw.store.tickets() == []
        assert (await send_message(gw.smtp_port, sign_inbound(message(), rsa_key)))[0].code == 250

    async def test_no_receipt_policy_still_forwards(self, gateway_factory, dns_stub, rsa_key) -> None:
        stub, port = dns_stub
        stub.records[CUSTOMER_RECORD] = rsa_key.txt
        gw = await gateway_factory(extra=autoreply_yaml(dns_port=port, unauthenticated="no_receipt"))
        tampered = sign_inbound(message(), rsa_key).replace(b"Please help.", b"Please pay.")
        assert (await send_message(gw.smtp_port, tampered))[0].code == 250
        assert (await outcome(gw.store, 1000)).detail["reason"] == "unauthenticated"
        await settle(gw.sink, 1)
        assert len(forwards(gw.sink)) == 1 and receipts(gw.sink) == []


class TestAlertSigning:
    async def test_alerts_to_supervisors_are_signed_too(self, gateway_factory, tmp_path, stub_dnsfunc, rsa_key) -> None:
        gw = await gateway_factory(extra=autoreply_yaml(dkim=dkim_yaml(tmp_path, rsa_key)))
        await gw.store.set_agent_away("bob", True, "test")
        refused = "550 5.1.1 mailbox unavailable"
        gw.sink.handler.refuse = {"alice@agents.example.test": refused, "lead@example.test": refused}
        assert (await send_message(gw.smtp_port, message())).pop().code == 250
        deadline = asyncio.get_running_loop().time() + 15
        while not [r for r in gw.sink.received if r.rcpt_tos == ["lead@example.test"]]:
            assert asyncio.get_running_loop().time() < deadline, "the supervisor alert never arrived"
            await asyncio.sleep(0.05)
        [alert] = [r for r in gw.sink.received if r.rcpt_tos == ["lead@example.test"]]
        assert b"Auto-Submitted: auto-generated" in alert.content
        assert dkim.verify(alert.content, dnsfunc=stub_dnsfunc({"gw._domainkey.example.test.": rsa_key.txt}))
