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
from dataclasses import dataclass, replace
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate

from .addresses import extract_address

_OOF_SUBJECT = re.compile(r"^\s*(automatic reply|auto(matic)?[- ]?response|out of (the )?office|autoreply)\b",
                          re.IGNORECASE)
_OOF_HEADERS = ("x-autoreply", "x-autorespond", "x-auto-reply", "x-autoresponder")
_INTERNAL_LINE = re.compile(
    r"^[ \t>]*(x-gatewayd-[\w-]+|x-original-[\w-]+|reply-to|return-path|delivered-to|received)[ \t]*:.*$",
    re.IGNORECASE | re.MULTILINE)
_TAG = re.compile(r"<[^>]{0,2000}>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_FILENAME = 200


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
    # The MIME structure could not be read (too deep, parser failure): nothing of it may be relayed.
    unreadable: bool = False


def read(raw: bytes, *, max_depth: int = 100) -> AgentMail:
    """The parts of an agent's message the reply path uses; best effort, never raises.

    ``From`` counts only when it holds exactly one clean mailbox
    (:func:`~gatewayd.addresses.extract_address`). A message whose MIME is
    deeper than ``max_depth`` or that the parser cannot take apart comes back
    ``unreadable`` with its headers only.
    """
    try:
        message = BytesParser(policy=policy.default).parsebytes(raw)
    except Exception:
        return _headers_only(raw)
    try:
        head = _head(message)
    except Exception:
        return _headers_only(raw)
    if _depth_exceeds(message, max_depth):
        return replace(head, unreadable=True)
    try:
        text, attachments = _content(message)
    except Exception:
        return replace(head, unreadable=True)
    return replace(head, text=text, attachments=attachments)


def _head(message: EmailMessage) -> AgentMail:
    values = message.get_all("From") or []
    sender = extract_address(_raw_value(message, "From")) if len(values) == 1 else None
    return AgentMail(sender.lower() if sender else None, _CONTROL.sub("", str(message.get("Subject", ""))), "",
                     is_auto_reply(message), ())


def _raw_value(message: EmailMessage, name: str) -> str:
    """The header's value as it arrived (undecoded), so extract_address judges what the sender wrote."""
    for key, value in message.raw_items():
        if key.lower() == name.lower():
            return str(value)
    return ""


def _headers_only(raw: bytes) -> AgentMail:
    try:
        message = BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)
        return replace(_head(message), unreadable=True)
    except Exception:
        return AgentMail(None, "", "", False, (), unreadable=True)


def _depth_exceeds(message: EmailMessage, max_depth: int) -> bool:
    stack = [(message, 0)]
    while stack:
        part, depth = stack.pop()
        if depth > max_depth:
            return True
        children = part.get_payload() if part.is_multipart() else None
        if isinstance(children, list):
            stack.extend((child, depth + 1) for child in children if isinstance(child, EmailMessage))
    return False


def _content(message: EmailMessage) -> tuple[str, tuple[Attachment, ...]]:
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
            try:
                filename = part.get_filename()
            except Exception:
                filename = None
            attachments.append(Attachment(payload, part.get_content_maintype(), part.get_content_subtype(),
                                          clean_filename(filename)))
    return text, tuple(attachments)


def clean_filename(name: str | None) -> str | None:
    """An attachment filename without control characters or path parts, or None when nothing is left."""
    if not name:
        return None
    cleaned = _CONTROL.sub("", str(name)).replace("/", "_").replace("\\", "_").strip(" .")
    return cleaned[:MAX_FILENAME] or None


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
                               filename=clean_filename(attachment.filename))
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
