"""Whether a receipt may be sent, and to whom (RFC 3834): never answer a machine.

:class:`Policy` is pure: it looks at the envelope sender, the raw header
fields and the DKIM verdict, and returns a :class:`Decision` carrying either
the validated recipient or the first suppression reason that applies (the
reason strings are stable: events and ``autoreplies_total{reason}`` use them).
:func:`rate_limited` and :func:`record` keep the rate-limit state in the store,
inside the caller's transaction, so two workers can never both squeeze under
a limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .addresses import display_name, extract_address
from .config import Config, RateConfig
from .dkim import Verdict
from .rawmessage import RawField, fields, header_block
from .store import Tx

_PRECEDENCE = frozenset({"bulk", "junk", "list", "auto_reply"})
_SUPPRESS_TOKENS = frozenset({"all", "autoreply", "oof"})
_AUTOREPLY_HEADERS = frozenset({"x-autoreply", "x-autorespond"})
_LOOP_HEADERS = frozenset({"x-loop", "x-rt-loop-prevention", "x-otrs-loop", "x-gatewayd-ticket"})
_REPORT_TYPES = ("multipart/report", "message/delivery-status", "message/disposition-notification",
                 "message/feedback-report")
_DAY = 24 * 3600.0

# Every reason a receipt can be withheld for, in the order they are checked.
REASONS = ("null_sender", "auto_submitted", "report", "precedence", "list", "suppress_header",
           "autoreply_header", "loop_header", "robot_sender", "own_address", "unauthenticated",
           "not_addressed", "rate_ticket", "rate_sender", "rate_domain", "rate_daily")


@dataclass(frozen=True)
class Decision:
    """``reason`` is ``"ok"`` when the receipt goes to ``rcpt``, else why it is suppressed."""

    reason: str
    rcpt: str | None = None
    name: str = ""

    @property
    def send(self) -> bool:
        return self.reason == "ok"


def _value(field: RawField) -> str:
    """The field value up to the first comment or parameter, lower-cased."""
    return re.split(r"[;(]", field.value, maxsplit=1)[0].strip().lower()


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _related(a: str, b: str) -> bool:
    """Same domain, or one a subdomain of the other (mail.example.org ~ example.org)."""
    return bool(a) and bool(b) and (a == b or a.endswith("." + b) or b.endswith("." + a))


class Policy:
    """The suppression table and the choice of recipient, from one configuration."""

    def __init__(self, config: Config) -> None:
        self._patterns = tuple(re.compile(p, re.IGNORECASE) for p in config.autoreply.suppress_senders)
        support = config.support
        self._support = frozenset(support.addresses)
        self._own_addresses = self._support | {support.bounce_address}
        self._own_domains = frozenset({*support.domains, config.hostname})
        self._no_receipt_unauthenticated = config.authentication.unauthenticated != "accept"

    def decide(self, mail_from: str, message: bytes, verdict: Verdict) -> Decision:
        block = header_block(message)
        headers = list(fields(block))
        reason = self._suppressed(mail_from, headers, verdict)
        if reason:
            return Decision(reason)
        return self._recipient(mail_from, headers, verdict)

    def _suppressed(self, mail_from: str, headers: list[RawField], verdict: Verdict) -> str | None:
        names = {f.name for f in headers}
        by_name = {n: [f for f in headers if f.name == n] for n in names}
        if not mail_from:
            return "null_sender"
        if any(_value(f) != "no" for f in by_name.get("auto-submitted", ())):
            return "auto_submitted"
        if any(_value(f).startswith(_REPORT_TYPES) for f in by_name.get("content-type", ())[:1]):
            return "report"
        if any(_value(f) in _PRECEDENCE for f in (*by_name.get("precedence", ()), *by_name.get("x-precedence", ()))):
            return "precedence"
        if any(n.startswith("list-") for n in names):
            return "list"
        for f in by_name.get("x-auto-response-suppress", ()):
            if _SUPPRESS_TOKENS & {t.strip().lower() for t in f.value.split(",")}:
                return "suppress_header"
        if names & _AUTOREPLY_HEADERS:
            return "autoreply_header"
        if names & _LOOP_HEADERS:
            return "loop_header"
        from_address = self._from(by_name)
        senders = [a for a in (mail_from, from_address) if a]
        if any(self._machine(a) for a in senders):
            return "robot_sender"
        if any(self._own(a) for a in senders):
            return "own_address"
        if verdict.unauthenticated and self._no_receipt_unauthenticated:
            return "unauthenticated"
        if not self._addressed(by_name):
            return "not_addressed"
        return None

    def _recipient(self, mail_from: str, headers: list[RawField], verdict: Verdict) -> Decision:
        """Reply-To if sane and aligned, else From if sane and aligned, else the envelope sender.

        Aligned: the domain is related to the envelope sender's or to a domain
        whose DKIM signature passed, so a header alone cannot aim a receipt at
        a stranger.
        """
        trusted = [_domain(mail_from), *verdict.pass_domains]
        for name in ("reply-to", "from"):
            found = [f for f in headers if f.name == name]
            if len(found) != 1:
                continue
            address = extract_address(found[0].value)
            if address is None or self._machine(address) or self._own(address):
                continue
            if any(_related(_domain(address), d) for d in trusted):
                return Decision("ok", address, display_name(found[0].value))
        return Decision("ok", mail_from)

    def _from(self, by_name: dict[str, list[RawField]]) -> str | None:
        found = by_name.get("from", [])
        return extract_address(found[0].value) if len(found) == 1 else None

    def _machine(self, address: str) -> bool:
        local = address.rpartition("@")[0]
        return any(p.search(local) for p in self._patterns)

    def _own(self, address: str) -> bool:
        domain = _domain(address)
        return address.lower() in self._own_addresses or any(domain == d or domain.endswith("." + d)
                                                              for d in self._own_domains)

    def _addressed(self, by_name: dict[str, list[RawField]]) -> bool:
        """A support address appears in To or Cc (else we were Bcc'd, typically by bulk mail)."""
        text = " ".join(f.value for n in ("to", "cc") for f in by_name.get(n, ())).lower()
        return any(re.search(rf"(?<![\w.!#$%&'*+/=?^`{{|}}~-]){re.escape(a)}(?![\w.-])", text) for a in self._support)


async def rate_limited(tx: Tx, rate: RateConfig, ticket: int, kind: str, rcpt: str, now: float) -> str | None:
    """The rate-limit reason that withholds this receipt, or None."""
    if kind == "receipt":
        row = await tx.fetchone("SELECT count(*) FROM autoreplies WHERE ticket = ? AND kind = 'receipt'", (ticket,))
        if row[0]:
            return "rate_ticket"
    since = now - rate.window
    checks: Iterable[tuple[str, str, tuple[object, ...], int]] = (
        ("rate_sender", "rcpt = ? AND at >= ?", (rcpt.lower(), since), rate.per_sender),
        ("rate_domain", "domain = ? AND at >= ?", (_domain(rcpt), since), rate.per_domain),
        ("rate_daily", "at >= ?", (now - _DAY,), rate.daily),
    )
    for reason, where, params, limit in checks:
        row = await tx.fetchone(f"SELECT count(*) FROM autoreplies WHERE {where}", params)
        if row[0] >= limit:
            return reason
    return None


async def record(tx: Tx, ticket: int, kind: str, rcpt: str, now: float, keep: float = 2 * _DAY) -> None:
    """Counts a queued receipt against the limits; rows older than any window are pruned."""
    await tx.execute("INSERT INTO autoreplies (ticket, kind, rcpt, domain, at) VALUES (?, ?, ?, ?, ?)",
                     (ticket, kind, rcpt.lower(), _domain(rcpt), now))
    await tx.execute("DELETE FROM autoreplies WHERE at < ? AND kind != 'receipt'", (now - keep,))
