"""SMTP and LMTP listeners on aiosmtpd, created on the daemon's own event loop.

What aiosmtpd leaves to us, and where it is done here:

* recipient policy (no open relay), envelope address hygiene, the recipient
  limit: :class:`SessionHandler` RCPT/MAIL hooks;
* one reply line per accepted recipient in LMTP, on every path, and ``451``
  instead of aiosmtpd's ``500 Error: (Type)`` leak: :meth:`SessionHandler.handle_DATA`
  and :meth:`SessionHandler.handle_exception`;
* connection limit, ``421`` on idle/DATA deadlines, PIPELINING and
  ENHANCEDSTATUSCODES advertisement: :class:`_GatewayProtocol`;
* reading DATA in bulk instead of line by line (aiosmtpd's reader is its
  bottleneck on large messages): :mod:`gatewayd.data_reader`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from .addresses import AddressError, has_control, parse_mailbox
from .config import Config, ListenerConfig
from .data_reader import read_section
from .errors import StoreError, StoreFull
from .intake import Intake, Refused, Transaction

log = logging.getLogger("gatewayd.listener")

_IDENT = "gatewayd ESMTP"
_STREAM_BUFFER = 64 * 1024
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# The parameters after the path start after plain blanks (no comment to skip).
_SIMPLE_PATH = re.compile(
    rf"\s*<(({_ATOM}(?:\.{_ATOM})*)@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+([^ \t(].*))?$", re.DOTALL)


@dataclass
class ListenerStats:
    """Live counters of one listener, read by metrics and health checks."""

    active: int = 0
    in_data: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class SessionHandler:
    """aiosmtpd handler shared by every session of one listener."""

    def __init__(self, listener: ListenerConfig, config: Config, intake: Intake, stats: ListenerStats,
                 observe: Callable[[str, str, float], None] = lambda listener, outcome, seconds: None) -> None:
        self.listener = listener
        self.config = config
        self.intake = intake
        self.stats = stats
        self._observe = observe
        self._lmtp = listener.protocol == "lmtp"

    def __dir__(self) -> tuple[str, ...]:
        """Only the hook names aiosmtpd's constructor looks for (see :meth:`_GatewayProtocol.__dir__`)."""
        return _hook_names(type(self), ("handle_", "auth_"))

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        keep = [r for r in responses[:-1] if not r[4:].upper().startswith("AUTH")]
        return keep + ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if address != "<>":
            reply = _address_problem(address, envelope.smtp_utf8, "sender")
            if reply:
                return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        reply = _address_problem(address, envelope.smtp_utf8, "recipient")
        if reply:
            return reply
        if len(envelope.rcpt_tos) >= self.config.limits.max_recipients:
            return "452 4.5.3 Too many recipients"
        if self.intake.recipient_kind(address) is None:
            return "550 5.1.1 No such mailbox here (this gateway accepts mail for its support addresses only)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        transaction = Transaction(
            listener=self.listener.name,
            peer=_peer(session.peer),
            mail_from="" if envelope.mail_from == "<>" else (envelope.mail_from or ""),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=envelope.original_content or b"",
        )
        self.stats.in_data += 1
        try:
            reply, outcome, ticket = await self._commit(transaction)
        finally:
            self.stats.in_data -= 1
        log.info("smtp transaction listener=%s peer=%s from=<%s> rcpts=%d size=%d outcome=%s ticket=%s reply=%r",
                 self.listener.name, transaction.peer, transaction.mail_from, len(transaction.rcpt_tos),
                 len(transaction.data), outcome, ticket or "-", reply)
        self.stats.count(outcome)
        self._observe(self.listener.name, outcome, time.monotonic() - started)
        return self._per_recipient(reply, len(transaction.rcpt_tos))

    async def _commit(self, transaction: Transaction) -> tuple[str, str, str | None]:
        """``(reply, outcome, ticket)``; store trouble becomes a 4xx, never a 250 or a 5xx."""
        try:
            accepted = await self.intake.accept(transaction)
        except Refused as refusal:
            return refusal.reply, "refused", None
        except StoreFull:
            log.error("store full: answering 452 to %s", transaction.peer)
            return "452 4.3.1 Insufficient system storage, try again later", "tempfail", None
        except StoreError as exc:
            log.error("store error during DATA from %s: %s", transaction.peer, exc)
            return "451 4.3.0 Temporary local problem, try again later", "tempfail", None
        except Exception:
            log.exception("unexpected error during DATA from %s", transaction.peer)
            return "451 4.3.0 Temporary local problem, try again later", "error", None
        ref = accepted.ticket or "bounce"
        return f"250 2.0.0 Ok: queued as {ref}", "duplicate" if accepted.duplicate else "accepted", ref

    async def handle_exception(self, error: Exception) -> str:
        log.exception("unexpected error in %s session", self.listener.name, exc_info=error)
        self.stats.count("error")
        return "451 4.3.0 Temporary local problem, try again later"

    def _per_recipient(self, reply: str, count: int) -> str:
        """LMTP answers once per accepted recipient (RFC 2033 § 4.2); SMTP once."""
        return "\r\n".join([reply] * count) if self._lmtp and count > 1 else reply


# aiosmtpd reads handle_EHLO's signature for every new session; inspect honours a precomputed one.
SessionHandler.handle_EHLO.__signature__ = inspect.signature(SessionHandler.handle_EHLO)  # type: ignore[attr-defined]


@functools.cache
def _hook_names(cls: type, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in dir(cls) if name.startswith(prefixes))


def _address_problem(address: str, smtputf8: bool, role: str) -> str | None:
    if has_control(address):
        return "501 5.1.7 Bad address syntax: control characters" if role == "sender" \
            else "553 5.1.3 Bad address syntax: control characters"
    if not address.isascii() and not smtputf8:
        return "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter"
    try:
        parse_mailbox(address, utf8=smtputf8)
    except AddressError:
        return "553 5.1.3 Bad address syntax" if role == "recipient" else "501 5.1.7 Bad sender address syntax"
    return None


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return f"{peer[0]}:{peer[1]}" if len(peer) > 1 else str(peer[0])
    return str(peer or "local")


class _Slots:
    """Counts sessions of one listener against ``limits.max_connections``."""

    def __init__(self, stats: ListenerStats, limit: int) -> None:
        self.stats = stats
        self.limit = limit

    def acquire(self) -> bool:
        if self.stats.active >= self.limit:
            return False
        self.stats.active += 1
        return True

    def release(self) -> None:
        self.stats.active -= 1


class _GatewayProtocol(SMTP):
    """Adds the limits aiosmtpd leaves open; mixed into both SMTP and LMTP below."""

    def __init__(self, handler: SessionHandler, *, slots: _Slots, data_timeout: float, line_limit: int,
                 **kwargs: Any) -> None:
        # aiosmtpd sizes its stream buffer by line_length_limit, and the stream
        # pauses the socket at twice that: a 1 KB buffer means a pause every
        # 2 KB of DATA. The buffer gets room for bulk reads; the line limit
        # itself is enforced by read_section (DATA) and aiosmtpd (commands).
        self.line_length_limit = _STREAM_BUFFER
        super().__init__(handler, **kwargs)
        self.line_length_limit = line_limit
        self._slots = slots
        self._data_timeout = data_timeout

    async def _handle_client(self) -> None:
        if not self._slots.acquire():
            log.warning("connection limit reached on %s; refusing %s",
                        self.event_handler.listener.name, _peer(self.session.peer if self.session else None))
            await self.push(f"421 4.7.0 {self.hostname} Too many connections, try again later")
            if self.transport is not None:
                self.transport.close()
            return
        try:
            await super()._handle_client()
        finally:
            self._slots.release()

    def __dir__(self) -> tuple[str, ...]:
        """Only the names aiosmtpd's constructor looks for in a session.

        It scans ``dir()`` of every new session, through inspect.getmembers,
        which evaluates every attribute: a third of a millisecond per
        connection for a list that is the same for every session of a class.
        """
        return _hook_names(type(self), ("smtp_", "auth_"))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT path parser, without its cost for the usual ``<local@domain>``.

        aiosmtpd runs email's header tokenizer (and defines a class) on every
        call; for a dot-atom address in angle brackets its result is exactly
        the text between them, so that case is read with one regex. Paths
        its tokenizer trips over are syntax errors.
        """
        match = _SIMPLE_PATH.match(arg)
        if match is None or (self.local_part_limit and len(match.group(2)) > self.local_part_limit):
            try:
                return super()._getaddr(arg)
            except (AttributeError, IndexError, TypeError, ValueError):
                # email's tokenizer trips over some garbage (e.g. "<a@[>"): a syntax error, not a 451.
                return None, None
        return match.group(1), match.group(3) or ""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA command with the bulk reader of :mod:`gatewayd.data_reader`.

        The whole section, however slowly it arrives, must come within
        ``limits.data_timeout``; the idle timeout applies again afterwards.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self._reset_timeout(self._data_timeout)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                # As in aiosmtpd and the SIZE extension, a limit of 0 means none.
                section = await read_section(self._reader, size_limit=self.data_size_limit or None,
                                             line_limit=self.line_length_limit)
            except asyncio.IncompleteReadError:
                # aiosmtpd's own signal for a lost client: it closes the session quietly.
                raise ConnectionResetError("connection closed during DATA") from None
            if section.problem is not None:
                self._set_post_data_state()
                await self.push("552 5.3.4 Error: Too much mail data" if section.problem == "too_big"
                                else "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)")
                return
            self.envelope.content = self.envelope.original_content = section.content
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push(status)
        finally:
            if self.transport is not None:
                self._reset_timeout()

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"421 4.4.2 {self.hostname} Timeout exceeded, closing connection\r\n".encode())
        super()._timeout_cb()


class GatewaySMTP(_GatewayProtocol):
    pass


class GatewayLMTP(_GatewayProtocol, LMTP):
    _data_rcpts = 0

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self._data_rcpts = len(self.envelope.rcpt_tos) if self.envelope else 0
        try:
            await super().smtp_DATA(arg)
        finally:
            self._data_rcpts = 0

    async def push(self, status: Any) -> None:
        """aiosmtpd answers an oversize or over-long DATA with one line; LMTP owes one per recipient."""
        if self._data_rcpts > 1 and isinstance(status, str) and status[:1] in "45" and "\r\n" not in status:
            status = "\r\n".join([status] * self._data_rcpts)
        await super().push(status)


def tls_context(listener: ListenerConfig) -> ssl.SSLContext | None:
    if listener.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(listener.tls.cert_file), str(listener.tls.key_file))
    return context


def protocol_factory(listener: ListenerConfig, config: Config, handler: SessionHandler,
                     stats: ListenerStats) -> Callable[[], SMTP]:
    cls = GatewayLMTP if listener.protocol == "lmtp" else GatewaySMTP
    slots = _Slots(stats, config.limits.max_connections)
    context = tls_context(listener)
    limits = config.limits

    def build() -> SMTP:
        return cls(handler, slots=slots, data_timeout=limits.data_timeout,
                   line_limit=limits.max_line_length + 3,
                   data_size_limit=limits.max_message_size, enable_SMTPUTF8=True, decode_data=False,
                   hostname=config.hostname, ident=_IDENT, tls_context=context, timeout=limits.idle_timeout,
                   loop=asyncio.get_running_loop())
    return build


async def start_server(listener: ListenerConfig, factory: Callable[[], SMTP]) -> asyncio.base_events.Server:
    """Binds one listener; unix sockets replace a stale socket file, never any other file.

    asyncio's accept loop already survives EMFILE/ENFILE: it logs
    "socket.accept() out of system resource" and retries a second later.
    """
    loop = asyncio.get_running_loop()
    address = listener.address
    if address.path is not None:
        path = Path(address.path)
        if path.is_socket():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        server = await loop.create_unix_server(factory, str(path))
        os.chmod(path, 0o660)
    else:
        server = await loop.create_server(factory, address.host, address.port, reuse_address=True)
    return server

