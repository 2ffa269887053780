"""A real mail path per test: Postfix in front of and behind gatewayd, Dovecot behind, DNS on loopback.

    customer / agent --swaks--> Postfix :MX ──LMTP (tcp or unix)──▶ gatewayd
                                (or swaks straight to gatewayd's SMTP listener, optionally STARTTLS)
    gatewayd --SMTP--> Postfix :relay port ──LMTP──▶ Dovecot (one mailbox per agent, supervisor, customer)

One Postfix instance plays both parts of docs/postfix.md: its MX port accepts
mail for ``example.test`` only and hands it to gatewayd over LMTP; a second
``smtpd`` on the relay port takes gatewayd's outgoing mail (forwards, receipts,
replies) from loopback and delivers it. ``agents.example.test`` and
``customer.test`` stand for the rest of the world: Postfix's transport map
sends them to Dovecot over LMTP, and every mailbox is read back with imaplib.

gatewayd runs in-process with receipts on, DKIM signing with a key published in
a loopback DNS stub, and ``dns.resolver`` pointed at that stub, so no test ever
sends a DNS query off the machine. Flows are written as: inject with
:meth:`MailPath.swaks`, then :meth:`MailPath.wait_for_mail` on the mailboxes.
"""

from __future__ import annotations

import asyncio
import email.policy
import grp
import imaplib
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import pytest

from gatewayd.dkim import GeneratedKey, generate_key
from tests.autoreply.conftest import DnsStub
from tests.support.gateway import REPO, free_port
from tests.support.mta import Dovecot, Postfix, scratch_dir, wait_for_port

MAILBOXES = ("alice", "bob", "sam", "lead", "ciso", "carol")
SUPPORT = "support@example.test"
CUSTOMER = "carol@customer.test"
DKIM_RECORD = "gw._domainkey.example.test."

# The Postfix listener gatewayd relays through (master.cf): loopback clients only, and they may send anywhere.
RELAY_SERVICE = """\
{listen} inet n - n - - smtpd
  -o syslog_name=postfix/gatewayd
  -o mynetworks=127.0.0.0/8
  -o smtpd_client_restrictions=permit_mynetworks,reject
  -o smtpd_relay_restrictions=permit_mynetworks,reject
"""

# Added to the relay service when the relay port takes mail only over STARTTLS (relay.starttls in gatewayd.yaml).
RELAY_TLS_OPTIONS = """\
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_cert_file={cert}
  -o smtpd_tls_key_file={key}
  -o smtpd_tls_received_header=yes
"""

# What the integration tests add to tests.support.gateway's base config: receipts, signing, loopback DNS.
GATEWAYD_EXTRA = """\
autoreply: {{templates: "{templates}"}}
dkim: {{domain: example.test, selector: gw, key_file: "{key_file}"}}
dns: {{resolver: "{resolver}", timeout: 1s}}
sla: {{ack: 15m, first_response: 4h}}
"""
FIRST_RESPONSE_HOURS = 4


def transport_map(gateway_lmtp: str, dovecot_lmtp: int) -> str:
    """The support domain to gatewayd; the stand-ins for the outside world to Dovecot."""
    return (f"example.test            lmtp:{gateway_lmtp}\n"
            f"agents.example.test     lmtp:inet:[127.0.0.1]:{dovecot_lmtp}\n"
            f"customer.test           lmtp:inet:[127.0.0.1]:{dovecot_lmtp}\n")


def postfix_for(root: Path, port: int, relay_port: int, gateway_lmtp: str, dovecot_lmtp: int,
                relay_tls: tuple[Path, Path] | None = None) -> Postfix:
    """The MX + relay recipe of docs/postfix.md, with gatewayd's LMTP next hop ``gateway_lmtp``; with
    ``relay_tls`` (certificate, key) the relay port takes mail only over STARTTLS."""
    services = RELAY_SERVICE.format(listen=f"127.0.0.1:{relay_port}")
    if relay_tls:
        services += RELAY_TLS_OPTIONS.format(cert=relay_tls[0], key=relay_tls[1])
    return Postfix(root, port, settings={
        "relay_domains": "example.test",
        "transport_maps": f"hash:{root}/conf/transport",
        "smtpd_relay_restrictions": "reject_unauth_destination",
        "recipient_delimiter": "+",
        "message_size_limit": "33554432",
    }, maps={"transport": transport_map(gateway_lmtp, dovecot_lmtp)},
        services=services)


class Mail(EmailMessage):
    """A message read over IMAP; ``raw`` is exactly what Dovecot stored (for DKIM verification)."""

    raw: bytes = b""


def loopback_dnsfunc(port: int) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` asking the loopback DNS stub on ``port`` (TXT records only)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.lifetime = resolver.timeout = 5

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)
    return lookup


@dataclass
class MailPath:
    postfix: Postfix
    relay_port: int
    dovecot: Dovecot
    gateway: Any
    dns: DnsStub
    dns_port: int

    async def swaks(self, *, port: int, subject: str, body: str = "Please help.", sender: str = CUSTOMER,
                    to: str = SUPPORT, headers: tuple[str, ...] = (), extra: tuple[str, ...] = (),
                    expect_ok: bool = True) -> str:
        """Sends one message with swaks and returns its transcript; unless ``expect_ok`` is False, the
        server must have said 250 to everything."""
        command = ["swaks", "--server", f"127.0.0.1:{port}", "--from", sender, "--to", to,
                   "--helo", f"client.{sender.rpartition('@')[2]}", "--header", f"Subject: {subject}",
                   "--body", body, "--timeout", "30", *(a for h in headers for a in ("--header", h)), *extra]
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        transcript = out.decode("utf-8", "replace")
        if expect_ok:
            assert process.returncode == 0, transcript
        return transcript

    async def inject(self, *, port: int, subject: str, body: str = "Please help.", sender: str = CUSTOMER,
                     to: str = SUPPORT, message_id: str | None = None, extra: tuple[str, ...] = ()) -> str:
        """A customer's message (swaks); returns the transcript (fails unless the server said 250)."""
        headers = (f"Message-Id: {message_id}",) if message_id else ()
        return await self.swaks(port=port, subject=subject, body=body, sender=sender, to=to, headers=headers,
                                extra=extra)

    def fetch(self, user: str) -> list[Mail]:
        """Every message in ``user``'s INBOX, over IMAP."""
        client = imaplib.IMAP4("127.0.0.1", self.dovecot.imap_port, timeout=10)
        try:
            client.login(user, "secret")
            client.select("INBOX", readonly=True)
            _, data = client.search(None, "ALL")
            messages = []
            for number in data[0].split():
                _, parts = client.fetch(number, "(BODY.PEEK[])")
                raw = parts[0][1]
                message = BytesParser(Mail, policy=email.policy.default).parsebytes(raw)
                message.raw = raw
                messages.append(message)
            return messages
        finally:
            client.logout()

    async def wait_for_mail(self, users: tuple[str, ...], match: Callable[[Mail], bool],
                            timeout: float = 30) -> list[tuple[str, Mail]]:
        """Polls the mailboxes until at least one message matches; returns every match as (user, message)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [(user, m) for user in users for m in await asyncio.to_thread(self.fetch, user) if match(m)]
            if found:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no matching mail in {users} after {timeout}s\n{await self.diagnosis()}")
            await asyncio.sleep(0.2)

    async def diagnosis(self) -> str:
        """What a failing wait shows: the Postfix log tail, gatewayd's outbox and what each mailbox holds."""
        log = self.postfix.log.read_text()[-3000:] if self.postfix.log.exists() else "(no log)"
        outbox = await self.gateway.store.fetchall("SELECT id, kind, rcpt, state, attempts, last_error FROM outbox")
        boxes = {user: [str(m.get("Subject", "")) for m in await asyncio.to_thread(self.fetch, user)]
                 for user in MAILBOXES}
        return f"postfix log tail:\n{log}\ngatewayd outbox: {[tuple(r) for r in outbox]}\nmailboxes: {boxes}"

    async def dkim_verifies(self, message: Mail) -> bool:
        """dkimpy's verdict on the message as stored, with the key looked up in the loopback DNS stub."""
        return await asyncio.to_thread(dkim.verify, message.raw, dnsfunc=loopback_dnsfunc(self.dns_port))

    async def tickets_show(self, ref: str) -> dict[str, Any]:
        """``gatewayd tickets show REF --json`` against the running daemon's store, as an admin runs it."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gatewayd", "tickets", "show", ref, "--json", "-c",
            str(self.gateway.config_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        return json.loads(out)


def _installed() -> bool:
    return all(shutil.which(tool) for tool in ("postfix", "postmap", "dovecot", "swaks"))


@pytest.fixture(scope="session")
def dkim_key() -> GeneratedKey:
    return generate_key("rsa-sha256", 2048)


@pytest.fixture
async def mail_path(gateway_factory: Callable[..., Any], dkim_key: GeneratedKey) -> AsyncIterator[Callable[..., Any]]:
    """``await mail_path(lmtp="tcp"|"unix", **gateway_overrides)`` starts DNS, Dovecot, gatewayd and Postfix."""
    if not _installed():
        pytest.fail("postfix, dovecot and swaks are needed: run `make integration-deps` (as root)")
    loop = asyncio.get_running_loop()
    dns_port = free_port()
    transport, stub = await loop.create_datagram_endpoint(DnsStub, local_addr=("127.0.0.1", dns_port))
    stub.records[DKIM_RECORD] = dkim_key.txt
    roots: list[Path] = []
    started: list[Dovecot | Postfix] = []

    async def start(lmtp: str = "tcp", relay_tls: tuple[Path, Path] | None = None, **overrides: Any) -> MailPath:
        root = scratch_dir("gw-it-")
        roots.append(root)
        (root / "dovecot").mkdir()
        dovecot = Dovecot(root / "dovecot", free_port(), free_port(), MAILBOXES)
        await asyncio.to_thread(dovecot.start)
        started.append(dovecot)
        (root / "gatewayd").mkdir()
        key_file = root / "gatewayd" / "dkim.key"
        key_file.write_bytes(dkim_key.private)
        socket_path = root / "gatewayd" / "lmtp.sock"
        mx_port, relay_port, gw_lmtp = free_port(), free_port(), free_port()
        extra = GATEWAYD_EXTRA.format(templates=REPO / "etc" / "templates", key_file=key_file,
                                      resolver=f"127.0.0.1:{dns_port}")
        gateway = await gateway_factory(relay_port=relay_port, lmtp_port=gw_lmtp, extra=extra,
                                        lmtp_socket=str(socket_path) if lmtp == "unix" else None, **overrides)
        if lmtp == "unix":
            # Postfix's lmtp client runs as the postfix user: give its group the socket.
            shutil.chown(socket_path, group=grp.getgrnam("postfix").gr_gid)
        hop = f"unix:{socket_path}" if lmtp == "unix" else f"inet:[127.0.0.1]:{gw_lmtp}"
        (root / "postfix").mkdir()
        postfix = postfix_for(root / "postfix", mx_port, relay_port, hop, dovecot.lmtp_port, relay_tls)
        await asyncio.to_thread(postfix.start)
        started.append(postfix)
        await asyncio.to_thread(wait_for_port, relay_port)
        return MailPath(postfix, relay_port, dovecot, gateway, stub, dns_port)

    yield start
    await asyncio.gather(*(asyncio.to_thread(server.stop) for server in started))
    transport.close()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=gw.example.test", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="session")
def relay_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for the relay port, naming 127.0.0.1 (the host in relay.address)."""
    folder = tmp_path_factory.mktemp("relay-tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=relay.example.test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:relay.example.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
