"""Building a receipt: a new message from templates, never from customer header bytes.

The message is an :class:`email.message.EmailMessage` serialised with
``policy.SMTP``. Every value taken from the customer's message is validated or
cleaned here first (Python 3.11.7 itself would copy an encoded CR/LF into a
header, CVE-2024-6923), and the finished header block is checked with our own
parser: exactly the fields we set, each once. Building is blocking work; the
caller runs it in a thread.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from .addresses import has_control, parse_mailbox
from .rawmessage import fields, header_block
from .templates import TemplateSet

_MESSAGE_ID = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>$")
_HEADERS = frozenset({"from", "to", "subject", "date", "message-id", "in-reply-to", "references", "reply-to",
                      "auto-submitted", "x-auto-response-suppress", "x-gatewayd-ticket", "mime-version",
                      "content-type", "content-transfer-encoding"})
_NAME_LIMIT = 64
_SUBJECT_LIMIT = 200


@dataclass(frozen=True)
class ReceiptContext:
    """Everything a receipt says; ``customer_*`` and ``subject`` come from the customer."""

    ticket: str
    support_address: str
    customer_address: str
    customer_name: str
    subject: str
    team: str | None
    expected: str
    message_id: str
    pseudo_reference: str
    customer_message_id: str | None
    date: datetime
    reply_to: str | None = None


def clean_text(value: str, limit: int) -> str:
    """One line of display text: control and line-separator characters become spaces."""
    text = "".join(" " if has_control(c) else c for c in value)
    return " ".join(text.split())[:limit]


def valid_message_id(value: str | None) -> str | None:
    """A ``<id>`` of printable ASCII only, or None."""
    return value if value and _MESSAGE_ID.match(value) else None


def placeholders(ctx: ReceiptContext) -> dict[str, str]:
    name = clean_text(ctx.customer_name, _NAME_LIMIT)
    return {"ticket": ctx.ticket, "customer_name": name, "greeting_name": name or "there",
            "subject": clean_text(ctx.subject, _SUBJECT_LIMIT) or "(no subject)", "team": ctx.team or "support",
            "expected": ctx.expected, "support_address": ctx.support_address}


def build(templates: TemplateSet, ctx: ReceiptContext) -> bytes:
    """The receipt's bytes (CRLF line endings, ready for the outbox)."""
    values = placeholders(ctx)
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = Address(addr_spec=parse_mailbox(ctx.support_address))
    message["To"] = _recipient(ctx.customer_address, values["customer_name"])
    message["Subject"] = clean_text(templates.subject.substitute(values), 998)
    message["Date"] = format_datetime(ctx.date)
    message["Message-ID"] = _checked_id(ctx.message_id)
    original = valid_message_id(ctx.customer_message_id)
    pseudo = _checked_id(ctx.pseudo_reference)
    message["In-Reply-To"] = original or pseudo
    message["References"] = f"{original} {pseudo}" if original else pseudo
    if ctx.reply_to:
        message["Reply-To"] = Address(addr_spec=parse_mailbox(ctx.reply_to))
    message["Auto-Submitted"] = "auto-replied"
    message["X-Auto-Response-Suppress"] = "All"
    message["X-Gatewayd-Ticket"] = ctx.ticket
    message.set_content(templates.text.substitute(values))
    message.add_alternative(templates.html.substitute(_escaped(values)), subtype="html")
    data = message.as_bytes()
    check_headers(data)
    return data


def _recipient(address: str, name: str) -> Address:
    addr = parse_mailbox(address)
    local, _, domain = addr.rpartition("@")
    return Address(display_name=name, username=local.strip('"'), domain=domain) if not local.startswith('"') \
        else Address(display_name=name, addr_spec=addr)


def _checked_id(value: str) -> str:
    if valid_message_id(value) is None:
        raise ValueError(f"not a Message-ID gatewayd can use: {value!r}")
    return value


def _escaped(values: Mapping[str, str]) -> dict[str, str]:
    return {k: html.escape(v) for k, v in values.items()}


def check_headers(data: bytes) -> None:
    """Refuses a built message whose header block holds anything but our fields, once each."""
    block = header_block(data)
    names = [f.name for f in fields(block)]
    unexpected = set(names) - _HEADERS
    repeated = {n for n in names if names.count(n) > 1}
    if unexpected or repeated or b"\r\n\r\n" not in data:
        raise ValueError(f"receipt header block is malformed: unexpected={sorted(unexpected)} "
                         f"repeated={sorted(repeated)}")
    for line in block.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or len(line) > 998:
            raise ValueError("receipt header block has a bare line break or an overlong line")
