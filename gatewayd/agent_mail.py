"""Reading an agent's mail and writing the customer-facing reply built from it.

Both run in a worker thread (the stdlib email package is CPU work on
arbitrary input). The reply is a new message, never the agent's bytes: the
customer sees the support address, gatewayd's threading headers and the
agent's text with gatewayd's internals (quoted ``X-Gatewayd-*`` lines, reply
addresses, the agent's own address) taken out.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate, getaddresses

_OOF_SUBJECT = re.compile(r"^\s*(automatic reply|auto(matic)?[- ]?response|out of (the )?office|autoreply)\b",
                          re.IGNORECASE)
_OOF_HEADERS = ("x-autoreply", "x-autorespond", "x-auto-reply", "x-autoresponder")
_INTERNAL_LINE = re.compile(
    r"^[ \t>]*(x-gatewayd-[\w-]+|x-original-[\w-]+|reply-to|return-path|delivered-to|received)[ \t]*:.*$",
    re.IGNORECASE | re.MULTILINE)
_TAG = re.compile(r"<[^>]{0,2000}>")


@dataclass(frozen=True)
class Attachment:
    content: bytes
    maintype: str
    subtype: str
    filename: str | None


@dataclass(frozen=True)
class AgentMail:
    from_address: str | None
    subject: str
    text: str
    auto_reply: bool
    attachments: tuple[Attachment, ...]


def read(raw: bytes) -> AgentMail:
    """The parts of an agent's message the reply path uses."""
    message = BytesParser(policy=policy.default).parsebytes(raw)
    addresses = [a for _, a in getaddresses([str(message.get("From", ""))]) if "@" in a]
    body = message.get_body(preferencelist=("plain", "html"))
    text = ""
    if body is not None:
        try:
            content = body.get_content()
        except (LookupError, ValueError):
            content = ""
        text = _html_text(content) if body.get_content_subtype() == "html" else str(content)
    attachments = []
    for part in message.iter_attachments():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            attachments.append(Attachment(payload, part.get_content_maintype(), part.get_content_subtype(),
                                          part.get_filename()))
    return AgentMail(addresses[0].lower() if addresses else None, str(message.get("Subject", "")), text,
                     is_auto_reply(message), tuple(attachments))


def is_auto_reply(message: EmailMessage) -> bool:
    """Vacation and out-of-office answers (RFC 3834 and what common mail servers add instead)."""
    submitted = str(message.get("Auto-Submitted", "no")).split(";")[0].strip().lower()
    if submitted and submitted != "no":
        return True
    if any(message.get(name) is not None for name in _OOF_HEADERS):
        return True
    if str(message.get("Precedence", "")).strip().lower() == "auto_reply":
        return True
    return bool(_OOF_SUBJECT.match(str(message.get("Subject", ""))))


def _html_text(content: str) -> str:
    text = re.sub(r"(?is)<(script|style).*?</\1>", "", content)
    text = re.sub(r"(?i)<br\s*/?>|</p>|</div>", "\n", text)
    return html.unescape(_TAG.sub("", text))


def scrub(text: str, *, hidden: tuple[str, ...], support_address: str, token_pattern: re.Pattern[str]) -> str:
    """Removes quoted internal header lines and replaces agent and reply addresses with the support address."""
    text = _INTERNAL_LINE.sub("", text)
    text = token_pattern.sub(support_address, text)
    for address in hidden:
        text = re.sub(re.escape(address), support_address, text, flags=re.IGNORECASE)
    return re.sub(r"\n{3,}", "\n\n", text)


@dataclass(frozen=True)
class Reply:
    """Everything the customer-facing message says, decided before it is built."""

    support_address: str
    display_name: str
    customer: str
    subject: str
    text: str
    message_id: str
    in_reply_to: str | None
    references: tuple[str, ...]
    reply_to: str
    ticket: str
    attachments: tuple[Attachment, ...] = ()


def build(reply: Reply) -> bytes:
    """The reply as bytes with CRLF line ends, ready for the outbox (no Auto-Submitted: a human wrote it)."""
    message = EmailMessage(policy=policy.SMTP)
    local, _, domain = reply.support_address.partition("@")
    message["From"] = Address(display_name=reply.display_name, username=local, domain=domain)
    message["To"] = reply.customer
    message["Subject"] = reply.subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = reply.message_id
    if reply.in_reply_to:
        message["In-Reply-To"] = reply.in_reply_to
    if reply.references:
        message["References"] = " ".join(reply.references)
    message["Reply-To"] = reply.reply_to
    message["X-Gatewayd-Ticket"] = reply.ticket
    text = reply.text.strip("\n") + "\n"
    message.set_content(text, cte="quoted-printable" if not text.isascii() or _long(text) else "7bit")
    for attachment in reply.attachments:
        message.add_attachment(attachment.content, maintype=attachment.maintype, subtype=attachment.subtype,
                               filename=attachment.filename)
    return message.as_bytes(policy=policy.SMTP)


def _long(text: str) -> bool:
    return any(len(line) > 900 for line in text.split("\n"))


def notice(*, sender: str, rcpt: str, subject: str, text: str, message_id: str, ticket: str) -> bytes:
    """A short machine notice (alerts, re-offers): ``Auto-Submitted: auto-generated``."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = rcpt
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message["X-Gatewayd-Ticket"] = ticket
    message.set_content(text.strip("\n") + "\n")
    return message.as_bytes(policy=policy.SMTP)
