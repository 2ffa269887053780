"""A real mail path per test: Postfix (MX and relay) in front of and behind gatewayd, Dovecot behind.

    customer --swaks--> Postfix :mx --LMTP (tcp or unix)--> gatewayd --SMTP--> Postfix :mx --LMTP--> Dovecot
                                         (or swaks straight to gatewayd's SMTP listener, STARTTLS)

One Postfix instance is both the MX for ``example.test`` (handed to gatewayd
over LMTP) and gatewayd's relay for everyone else (``agents.example.test`` and
``customer.test`` are delivered to Dovecot over LMTP). Every mailbox, agents'
and customer's, is read back with imaplib, so the receipt and agent-reply flows
are tests of the same shape: inject with :meth:`MailPath.inject`, read with
:meth:`MailPath.wait_for_mail`.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import grp
import imaplib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import free_port
from tests.support.mta import Dovecot, Postfix, scratch_dir

MAILBOXES = ("alice", "bob", "sam", "lead", "ciso", "carol")


def _installed() -> bool:
    return all(shutil.which(tool) for tool in ("postfix", "dovecot", "swaks"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not _installed():
        for item in items:
            if "tests/integration" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason="postfix, dovecot and swaks are needed: make integration-deps"))


@dataclass
class MailPath:
    postfix: Postfix
    dovecot: Dovecot
    gateway: Any

    async def inject(self, *, port: int, subject: str, body: str = "Please help.", sender: str = "carol@customer.test",
                     to: str = "support@example.test", message_id: str | None = None,
                     extra: tuple[str, ...] = ()) -> str:
        """Sends one message with swaks; returns its transcript (fails unless the server said 250)."""
        command = ["swaks", "--server", f"127.0.0.1:{port}", "--from", sender, "--to", to,
                   "--helo", "client.customer.test", "--header", f"Subject: {subject}", "--body", body,
                   "--timeout", "30", *extra]
        if message_id:
            command += ["--header", f"Message-Id: {message_id}"]
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        transcript = out.decode("utf-8", "replace")
        assert process.returncode == 0, transcript
        return transcript

    def fetch(self, user: str) -> list[EmailMessage]:
        """Every message in ``user``'s INBOX, over IMAP."""
        client = imaplib.IMAP4("127.0.0.1", self.dovecot.imap_port, timeout=10)
        try:
            client.login(user, "secret")
            client.select("INBOX", readonly=True)
            _, data = client.search(None, "ALL")
            messages = []
            for number in data[0].split():
                _, parts = client.fetch(number, "(RFC822)")
                raw = parts[0][1]
                messages.append(email.message_from_bytes(raw, policy=email.policy.default))
            return messages
        finally:
            client.logout()

    async def wait_for_mail(self, users: tuple[str, ...], match: Callable[[EmailMessage], bool],
                            timeout: float = 60) -> list[tuple[str, EmailMessage]]:
        """Polls the mailboxes until at least one message matches; returns every match as (user, message)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [(user, m) for user in users for m in await asyncio.to_thread(self.fetch, user) if match(m)]
            if found:
                return found
            if asyncio.get_running_loop().time() > deadline:
                log = self.postfix.log.read_text()[-3000:] if self.postfix.log.exists() else ""
                raise AssertionError(f"no matching mail in {users} after {timeout}s; postfix log tail:\n{log}")
            await asyncio.sleep(0.3)


def postfix_for(root: Path, port: int, gateway_lmtp: str, dovecot_lmtp: int) -> Postfix:
    """The MX + relay recipe of docs/postfix.md, with gatewayd's LMTP next hop ``gateway_lmtp``."""
    return Postfix(root, port, settings={
        "relay_domains": "example.test, agents.example.test, customer.test",
        "transport_maps": f"hash:{root}/conf/transport",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "recipient_delimiter": "+",
        "message_size_limit": "33554432",
    }, maps={"transport": (
        f"example.test            lmtp:{gateway_lmtp}\n"
        f"agents.example.test     lmtp:inet:[127.0.0.1]:{dovecot_lmtp}\n"
        f"customer.test           lmtp:inet:[127.0.0.1]:{dovecot_lmtp}\n")})


@pytest.fixture
async def mail_path(gateway_factory: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    """``await mail_path(lmtp="tcp"|"unix", **gateway_overrides)`` starts Dovecot, Postfix and gatewayd."""
    started: list[Any] = []

    async def start(lmtp: str = "tcp", **overrides: Any) -> MailPath:
        root = scratch_dir("gw-it-")
        dovecot = Dovecot(root / "dovecot", free_port(), free_port(), MAILBOXES)
        (root / "dovecot").mkdir()
        await asyncio.to_thread(dovecot.start)
        started.append(dovecot)
        socket_path = root / "gatewayd" / "lmtp.sock"
        pf_port, gw_lmtp = free_port(), free_port()
        gateway = await gateway_factory(relay_port=pf_port, lmtp_port=gw_lmtp,
                                        lmtp_socket=str(socket_path) if lmtp == "unix" else None, **overrides)
        if lmtp == "unix":
            # Postfix's lmtp client runs as the postfix user: give its group the socket.
            os.chown(socket_path, -1, grp.getgrnam("postfix").gr_gid)
        hop = f"unix:{socket_path}" if lmtp == "unix" else f"inet:[127.0.0.1]:{gw_lmtp}"
        postfix = postfix_for(root / "postfix", pf_port, hop, dovecot.lmtp_port)
        (root / "postfix").mkdir()
        await asyncio.to_thread(postfix.start)
        started.append(postfix)
        return MailPath(postfix, dovecot, gateway)

    yield start
    for server in reversed(started):
        await asyncio.to_thread(server.stop)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=gw.example.test", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
