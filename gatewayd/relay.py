"""Sending messages to the configured relay over a few reused SMTP sessions, and classifying the answers.

smtplib runs in worker threads of the relay's own: it is the standard
library's well-tested client, and a thread per in-flight delivery is cheap at
the relay concurrency gatewayd uses. The cost worth saving is the handshake:
TCP, banner, EHLO (and STARTTLS) per message. So a session that delivered a
message stays open for the next one. At most ``relay.concurrency`` sessions
are kept; one idle for :data:`IDLE_SECONDS` is closed, and so is any session
that saw a refusal or an error (a fresh one is cheap, a confused one is not).
A session the relay closed while it sat idle is noticed before use, or at the
``MAIL`` it fails, and the message then goes over a new session: it never
costs an attempt. The answers are classified the same way for either.
"""

from __future__ import annotations

import asyncio
import select
import smtplib
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from .config import RelayConfig

IDLE_SECONDS = 5.0


@dataclass(frozen=True)
class SendResult:
    outcome: Literal["sent", "retry", "failed"]
    reply: str

    @property
    def sent(self) -> bool:
        return self.outcome == "sent"


class _Stale(Exception):
    """A reused session turned out closed before the relay took anything."""


def _reply(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return f"{code} {' '.join(text.split())}"[:500]


def _classify(code: int, message: bytes | str) -> SendResult:
    return SendResult("failed" if 500 <= code < 600 else "retry", _reply(code, message))


def tls_context(relay: RelayConfig) -> ssl.SSLContext | None:
    """How the relay's certificate is checked (None: no STARTTLS).

    Against ``relay.ca_file`` alone when given, else the system's CAs; the
    certificate must name the host of ``relay.address`` (a DNS name or an IP
    address). A relay that fails the check gets nothing: the attempt is a
    temporary failure, retried like a relay that is down.
    """
    if not relay.starttls:
        return None
    return ssl.create_default_context(cafile=relay.ca_file)


def _connect(relay: RelayConfig, helo: str, tls: ssl.SSLContext | None) -> smtplib.SMTP:
    client = smtplib.SMTP(relay.address.host or "127.0.0.1", relay.address.port or 25,
                          local_hostname=helo, timeout=relay.timeout)
    try:
        client.ehlo()
        if tls is not None:
            client.starttls(context=tls)
            client.ehlo()
    except BaseException:
        client.close()
        raise
    return client


def _idle_and_open(client: smtplib.SMTP) -> bool:
    """False when the relay closed the session, or said something unasked (a ``421`` before closing)."""
    sock = client.sock
    if sock is None:
        return False
    # poll, not select: select refuses descriptors above 1023, which a busy daemon reaches.
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    try:
        return not poller.poll(0)
    except OSError:
        return False


def _transaction(client: smtplib.SMTP, mail_from: str, rcpt: str, content: bytes, reused: bool) -> SendResult:
    options = []
    if not content.isascii() and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if not (mail_from.isascii() and rcpt.isascii()):
        if not client.has_extn("smtputf8"):
            return SendResult("failed", "relay does not offer SMTPUTF8 for a non-ASCII address")
        options.append("SMTPUTF8")
    try:
        code, message = client.mail(mail_from, options)
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        # A relay that is merely slow is not stale: a second session would only wait as long again.
        if reused and not isinstance(exc, TimeoutError) and not isinstance(exc.__context__, TimeoutError):
            raise _Stale from exc
        raise
    if code == 421 and reused:
        raise _Stale
    if code != 250:
        return _classify(code, message)
    code, message = client.rcpt(rcpt)
    if code not in (250, 251):
        return _classify(code, message)
    code, message = client.data(content)
    if code != 250:
        return _classify(code, message)
    return SendResult("sent", _reply(code, message))


def close_session(client: smtplib.SMTP) -> None:
    """``QUIT`` if the relay still listens, then close; never raises."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def deliver(session: smtplib.SMTP | None, relay: RelayConfig, tls: ssl.SSLContext | None, helo: str,
            mail_from: str, rcpt: str, content: bytes) -> tuple[SendResult, smtplib.SMTP | None]:
    """One SMTP transaction, on ``session`` if it is still usable, else on a new one; blocking.

    Returns the result and the session when it may carry the next message
    (None: it was closed). Never raises for SMTP or network trouble.
    """
    if session is not None and not _idle_and_open(session):
        close_session(session)
        session = None
    if session is not None:
        try:
            return _keep_if_sent(session, _transaction(session, mail_from, rcpt, content, reused=True))
        except _Stale:
            close_session(session)
        except (smtplib.SMTPException, OSError) as exc:
            close_session(session)
            return _failure(exc), None
    try:
        session = _connect(relay, helo, tls)
    except (smtplib.SMTPException, OSError) as exc:
        return _failure(exc), None
    try:
        return _keep_if_sent(session, _transaction(session, mail_from, rcpt, content, reused=False))
    except (smtplib.SMTPException, OSError) as exc:
        close_session(session)
        return _failure(exc), None


def _keep_if_sent(session: smtplib.SMTP, result: SendResult) -> tuple[SendResult, smtplib.SMTP | None]:
    if result.sent:
        return result, session
    close_session(session)
    return result, None


def _failure(exc: BaseException) -> SendResult:
    if isinstance(exc, smtplib.SMTPResponseException):
        return _classify(exc.smtp_code, exc.smtp_error)
    return SendResult("retry", f"{type(exc).__name__}: {exc}"[:500])


@dataclass
class _Idle:
    client: smtplib.SMTP
    since: float


class Relay:
    """The relay as the outbox uses it: ``send`` one message at a time per caller, over reused sessions.

    Sessions are handed to one worker thread at a time and parked on the event
    loop between messages; the most recently used is reused first, so the rest
    age out when traffic drops.
    """

    def __init__(self, config: RelayConfig, helo: str, *, idle_seconds: float = IDLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.helo = helo
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._idle: list[_Idle] = []
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._closed = False
        # Threads of its own: a hung relay holds these until relay.timeout, never the
        # loop's default pool that intake, parsing and signing need meanwhile.
        self._threads = ThreadPoolExecutor(config.concurrency + 1, thread_name_prefix="gatewayd-relay")
        self._tls = tls_context(config)

    async def send(self, mail_from: str, rcpt: str, content: bytes) -> SendResult:
        session = self._idle.pop().client if self._idle else None
        result, kept = await asyncio.get_running_loop().run_in_executor(
            self._threads, deliver, session, self.config, self._tls, self.helo, mail_from, rcpt, content)
        if kept is not None:
            if self._closed or len(self._idle) >= self.config.concurrency:
                self._close_later(kept)
            else:
                self._idle.append(_Idle(kept, self._clock()))
                self._arm()
        return result

    @property
    def idle_sessions(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        """Closes every idle session (``QUIT``); one still in use is closed when its message is done."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        while self._idle:
            self._close_later(self._idle.pop().client)
        if self._closing:
            await asyncio.wait(set(self._closing))

    def _arm(self) -> None:
        if self._reaper is None and self._idle:
            oldest = min(idle.since for idle in self._idle)
            delay = max(0.0, oldest + self.idle_seconds - self._clock())
            self._reaper = asyncio.get_running_loop().call_later(delay, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = self._clock()
        expired = [idle for idle in self._idle if now - idle.since >= self.idle_seconds]
        self._idle = [idle for idle in self._idle if now - idle.since < self.idle_seconds]
        for idle in expired:
            self._close_later(idle.client)
        self._arm()

    def _close_later(self, client: smtplib.SMTP) -> None:
        future = asyncio.get_running_loop().run_in_executor(self._threads, close_session, client)
        self._closing.add(future)
        future.add_done_callback(self._closing.discard)

