"""Sending one message to the configured relay, and classifying the answer.

smtplib runs in a worker thread (``asyncio.to_thread``): it is the standard
library's well-tested client, and a thread per in-flight delivery is cheap at
the relay concurrency gatewayd uses.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from dataclasses import dataclass
from typing import Literal

from .config import RelayConfig


@dataclass(frozen=True)
class SendResult:
    outcome: Literal["sent", "retry", "failed"]
    reply: str

    @property
    def sent(self) -> bool:
        return self.outcome == "sent"


def _reply(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return f"{code} {' '.join(text.split())}"[:500]


def _classify(code: int, message: bytes | str) -> SendResult:
    return SendResult("failed" if 500 <= code < 600 else "retry", _reply(code, message))


def send_blocking(relay: RelayConfig, helo: str, mail_from: str, rcpt: str, content: bytes) -> SendResult:
    """One SMTP transaction with the relay; never raises for SMTP or network trouble."""
    try:
        with smtplib.SMTP(relay.address.host or "127.0.0.1", relay.address.port or 25,
                          local_hostname=helo, timeout=relay.timeout) as client:
            client.ehlo()
            if relay.starttls:
                client.starttls(context=ssl.create_default_context())
                client.ehlo()
            options = []
            if not content.isascii() and client.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if not (mail_from.isascii() and rcpt.isascii()):
                if not client.has_extn("smtputf8"):
                    return SendResult("failed", "relay does not offer SMTPUTF8 for a non-ASCII address")
                options.append("SMTPUTF8")
            code, message = client.mail(mail_from, options)
            if code != 250:
                return _classify(code, message)
            code, message = client.rcpt(rcpt)
            if code not in (250, 251):
                return _classify(code, message)
            code, message = client.data(content)
            if code != 250:
                return _classify(code, message)
            return SendResult("sent", _reply(code, message))
    except smtplib.SMTPResponseException as exc:
        return _classify(exc.smtp_code, exc.smtp_error)
    except (smtplib.SMTPException, OSError, socket.timeout, ssl.SSLError) as exc:
        return SendResult("retry", f"{type(exc).__name__}: {exc}"[:500])


async def send(relay: RelayConfig, helo: str, mail_from: str, rcpt: str, content: bytes) -> SendResult:
    return await asyncio.to_thread(send_blocking, relay, helo, mail_from, rcpt, content)
