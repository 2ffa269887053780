"""Sending messages to the configured relay over a few reused SMTP sessions, and classifying the answers.

The client is gatewayd's own, on the event loop. smtplib in worker threads
cost, per message, a trip to a thread and back, four round trips to the relay
(MAIL, RCPT, DATA, the end of data) and two regular-expression passes over the
content; the relay path was the largest part of the pipeline's time (bench, 4
KB at c=10: 441-453 msg/s with it, 674-746 with a relay that cost nothing).
Here a session that offers PIPELINING (RFC 2920; Postfix and every common MTA
do) gets MAIL, RCPT and DATA in one write: two round trips per message. A
session that does not gets one command at a time.

The other cost worth saving is the handshake: TCP, banner, EHLO (and
STARTTLS) per message. So a session that delivered a message stays open for
the next one. At most ``relay.concurrency`` sessions are kept; one idle for
:data:`IDLE_SECONDS` is closed, and so is any session that saw a refusal or an
error (a fresh one is cheap, a confused one is not). A session the relay
closed while it sat idle is noticed before use, or at the ``MAIL`` it fails,
and the message then goes over a new session: it never costs an attempt. The
answers are classified the same way for either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .config import RelayConfig

IDLE_SECONDS = 5.0
QUIT_SECONDS = 2.0  # how long a closing session waits for the relay's 221
_LINE_LIMIT = 64 * 1024  # the longest reply line read
_REPLY_LINES = 200  # the most lines of one reply (an EHLO has a dozen)
_INLINE_STUFFING = 256 * 1024  # larger content is dot-stuffed in a worker thread

log = logging.getLogger("gatewayd.relay")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f<>]")


@dataclass(frozen=True)
class SendResult:
    outcome: Literal["sent", "retry", "failed"]
    reply: str

    @property
    def sent(self) -> bool:
        return self.outcome == "sent"


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.split())}"[:500]


class _Stale(Exception):
    """A reused session turned out closed before the relay took anything."""


class _Refused(Exception):
    """The relay would not open a session: its banner, EHLO or STARTTLS answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class ProtocolError(Exception):
    """The relay said something that is not an SMTP reply."""


def _classify(reply: Reply) -> SendResult:
    return SendResult("failed" if 500 <= reply.code < 600 else "retry", str(reply))


def _failure(exc: BaseException) -> SendResult:
    if isinstance(exc, _Refused):
        # Refused at the banner, EHLO or STARTTLS: the relay's trouble, not this message's.
        return SendResult("retry", str(exc.reply))
    detail = str(exc) or ("timed out waiting for the relay (relay.timeout)" if isinstance(exc, TimeoutError)
                          else "the relay closed the connection" if isinstance(exc, ConnectionError)
                          else "no detail")
    return SendResult("retry", f"{type(exc).__name__}: {detail}"[:500])


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


def dot_stuffed(content: bytes) -> bytes:
    """``content`` as DATA sends it: CRLF line ends, leading dots doubled, ending in ``CRLF.CRLF``.

    A bare CR or LF is made a CRLF first, as smtplib does: left alone, a relay
    that ends lines at a bare LF could read ``LF.CRLF`` as the end of the data.
    """
    # splitlines breaks at CRLF, CR and LF alike (and drops a final break, added back below).
    content = b"\r\n".join(content.splitlines()).replace(b"\r\n.", b"\r\n..")
    if content.startswith(b"."):
        content = b"." + content
    return content + b"\r\n.\r\n"


class Session:
    """One SMTP session with the relay, after the banner and EHLO (and STARTTLS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: frozenset[str] = frozenset()
        self._clear: asyncio.StreamWriter | None = None

    @classmethod
    async def open(cls, relay: RelayConfig, helo: str, tls: ssl.SSLContext | None) -> "Session":
        host, port = relay.address.host or "127.0.0.1", relay.address.port or 25
        async with asyncio.timeout(relay.timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=_LINE_LIMIT)
        session = cls(reader, writer, relay.timeout)
        try:
            banner = await session.reply()
            if banner.code != 220:
                raise _Refused(banner)
            await session.hello(helo)
            if tls is not None:
                if "STARTTLS" not in session.extensions:
                    raise _Refused(Reply(454, "relay.starttls is set but the relay does not offer STARTTLS"))
                answer = await session.command(b"STARTTLS\r\n")
                if answer.code != 220:
                    raise _Refused(answer)
                async with asyncio.timeout(relay.timeout):
                    await session._upgrade(tls, host)
                await session.hello(helo)
        except BaseException:
            session.abort()
            raise
        return session

    async def _upgrade(self, tls: ssl.SSLContext, host: str) -> None:
        """TLS on this connection, read through a new stream.

        Whatever arrived in clear after the relay's 220 (a man in the middle
        can append "250 ok" lines to it, CVE-2011-0411 in other MTAs) stays in
        the old stream's buffer and is never read as the relay's answer.
        """
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport = await loop.start_tls(self.writer.transport, protocol, tls, server_hostname=host)
        protocol.connection_made(transport)  # start_tls leaves that to the protocol's owner
        # The clear-text writer is kept: dropped, it would close the socket under the TLS stream.
        self._clear = self.writer
        self.reader, self.writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def hello(self, helo: str) -> None:
        answer = await self.command(f"EHLO {helo}\r\n".encode("ascii"))
        if answer.code == 250:
            self.extensions = frozenset(line.split(" ", 1)[0].upper() for line in answer.text.split("\n")[1:])
            return
        answer = await self.command(f"HELO {helo}\r\n".encode("ascii"))
        if answer.code != 250:
            raise _Refused(answer)
        self.extensions = frozenset()

    async def reply(self) -> Reply:
        """The next reply, all of its lines (their texts joined by newlines)."""
        texts: list[str] = []
        async with asyncio.timeout(self.timeout):
            while True:
                try:
                    line = await self.reader.readline()
                except ValueError as exc:  # longer than the reader's limit: no relay says that much
                    raise ProtocolError("a reply line of more than 64 KiB") from exc
                if not line.endswith(b"\n"):
                    raise ConnectionResetError("the relay closed the connection")
                code, more, text = line[:3], line[3:4], line[4:].strip()
                if not code.isdigit() or more not in (b" ", b"-", b"\r", b"\n"):
                    raise ProtocolError(f"not an SMTP reply: {line[:80]!r}")
                texts.append(text.decode("utf-8", "replace"))
                if more != b"-":
                    return Reply(int(code), "\n".join(texts))
                if len(texts) >= _REPLY_LINES:
                    raise ProtocolError(f"a reply of more than {_REPLY_LINES} lines")

    async def command(self, line: bytes) -> Reply:
        self.writer.write(line)
        return await self.reply()

    @property
    def usable(self) -> bool:
        """False once the relay closed the session. A ``421`` it sent before closing is read at ``MAIL``
        instead, and the message then goes over a new session (see :meth:`send`)."""
        return not (self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None)

    async def send(self, mail_from: str, rcpt: str, content: bytes, *, reused: bool) -> SendResult:
        """One transaction. On a reused session, a relay that had already gone raises :class:`_Stale`."""
        if _UNSAFE.search(mail_from) or _UNSAFE.search(rcpt):
            return SendResult("failed", "address with a control character or angle bracket: not sent")
        options = ""
        if not content.isascii() and "8BITMIME" in self.extensions:
            options += " BODY=8BITMIME"
        if not (mail_from.isascii() and rcpt.isascii()):
            if "SMTPUTF8" not in self.extensions:
                return SendResult("failed", "relay does not offer SMTPUTF8 for a non-ASCII address")
            options += " SMTPUTF8"
        mail = f"MAIL FROM:<{mail_from}>{options}\r\n".encode()
        to = f"RCPT TO:<{rcpt}>\r\n".encode()
        if "PIPELINING" in self.extensions:
            self.writer.write(mail + to + b"DATA\r\n")
            answer = await self._mail_reply(reused)
            if answer.code != 250:
                return _classify(answer)
            answer = await self.reply()
            if answer.code not in (250, 251):
                return _classify(answer)
            answer = await self.reply()
        else:
            self.writer.write(mail)
            answer = await self._mail_reply(reused)
            if answer.code != 250:
                return _classify(answer)
            answer = await self.command(to)
            if answer.code not in (250, 251):
                return _classify(answer)
            answer = await self.command(b"DATA\r\n")
        if answer.code != 354:
            return _classify(answer)
        # A few passes over the content: for a large message, off the loop (about 2 ms per MB).
        stuffed = dot_stuffed(content) if len(content) <= _INLINE_STUFFING \
            else await asyncio.to_thread(dot_stuffed, content)
        self.writer.write(stuffed)
        async with asyncio.timeout(self.timeout):
            await self.writer.drain()
        answer = await self.reply()
        return SendResult("sent", str(answer)) if answer.code == 250 else _classify(answer)

    async def _mail_reply(self, reused: bool) -> Reply:
        try:
            answer = await self.reply()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # A relay that is merely slow is not stale: a second session would only wait as long again.
            if reused:
                raise _Stale from exc
            raise
        if answer.code == 421 and reused:
            raise _Stale
        return answer

    async def quit(self) -> None:
        """``QUIT`` if the relay still listens, then close; never raises."""
        try:
            if self.usable:
                self.writer.write(b"QUIT\r\n")
                async with asyncio.timeout(QUIT_SECONDS):
                    await self.reader.readline()
        except (OSError, TimeoutError, ssl.SSLError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        self.writer.transport.abort()


def _stamp(path: os.PathLike[str] | None) -> tuple[int, int] | None:
    try:
        status = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size) if status else None


@dataclass
class _Idle:
    session: Session
    since: float


class Relay:
    """The relay as the outbox uses it: ``send`` one message at a time per caller, over reused sessions.

    Sessions are parked between messages; the most recently used is reused
    first, so the rest age out when traffic drops.
    """

    def __init__(self, config: RelayConfig, helo: str, *, idle_seconds: float = IDLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.helo = helo
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._tls = tls_context(config)
        self._ca_stamp = _stamp(config.ca_file)
        self._idle: list[_Idle] = []
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def send(self, mail_from: str, rcpt: str, content: bytes) -> SendResult:
        """One message; never raises for SMTP or network trouble (only when cancelled)."""
        while self._idle:
            session = self._idle.pop().session
            if not session.usable:
                self._close_later(session)
                continue
            try:
                return await self._on(session, mail_from, rcpt, content, reused=True)
            except _Stale:
                break
        try:
            session = await Session.open(self.config, self.helo, self._current_tls())
        except (OSError, TimeoutError, ProtocolError, ssl.SSLError, _Refused) as exc:
            return _failure(exc)
        return await self._on(session, mail_from, rcpt, content, reused=False)

    async def _on(self, session: Session, mail_from: str, rcpt: str, content: bytes, *, reused: bool) -> SendResult:
        """The transaction on ``session``; a session that failed or was cancelled is never used again."""
        try:
            return self._after(session, await session.send(mail_from, rcpt, content, reused=reused))
        except (OSError, TimeoutError, ProtocolError, ssl.SSLError) as exc:
            session.abort()
            return _failure(exc)
        except BaseException:  # _Stale (the caller opens a new session) or a cancellation
            session.abort()
            raise

    def _current_tls(self) -> ssl.SSLContext | None:
        """The TLS context, rebuilt when ``relay.ca_file`` changed (a renewed relay certificate)."""
        stamp = _stamp(self.config.ca_file)
        if stamp != self._ca_stamp:
            self._tls, self._ca_stamp = tls_context(self.config), stamp
        return self._tls

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
            self._close_later(self._idle.pop().session)
        if self._closing:
            await asyncio.wait(set(self._closing))

    def _after(self, session: Session, result: SendResult) -> SendResult:
        """Parks a session that delivered; any other outcome closes it."""
        if not result.sent or self._closed or len(self._idle) >= self.config.concurrency:
            self._close_later(session)
        else:
            self._idle.append(_Idle(session, self._clock()))
            self._arm()
        return result

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
            self._close_later(idle.session)
        self._arm()

    def _close_later(self, session: Session) -> None:
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
