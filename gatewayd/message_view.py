"""Raw message bytes -> :class:`~gatewayd.plugin.MessageView`, best effort and never raising.

Routing must work on whatever arrived: unknown charsets, NUL bytes, broken or
absurdly deep MIME. This module is pure and blocking (the core runs it in a
thread); every failure degrades to an emptier view instead of an exception,
because a message that was accepted must still be routed.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from html.parser import HTMLParser
from types import MappingProxyType
from typing import Any

from .addresses import extract_address
from .plugin import MessageView

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f])
_BLANK_LINES = re.compile(r"\n{3,}")


def message_view_from_bytes(raw: bytes, mail_from: str, rcpt_tos: Sequence[str], *,
                            max_depth: int = 100, max_body: int = 65536, defer_body: bool = False) -> MessageView:
    """Parses ``raw`` with ``email.policy.default``; the body is the first text/plain part.

    Falls back to the first text/html part stripped of tags; walks MIME no deeper
    than ``max_depth`` and keeps at most ``max_body`` characters of body.
    With ``defer_body`` only the header block is parsed now, and the body
    when ``view.body`` is first read.
    """
    try:
        head: Message | None = parse_head(raw)
        headers = _headers(head)
    except Exception:
        head, headers = None, _fallback_headers(raw)
    subject = " ".join(headers.get("subject", ("",))[0].split())
    from_values = headers.get("from", ())
    sender = (extract_address(from_values[0]) if len(from_values) == 1 else None) or mail_from
    message_ids = headers.get("message-id", ())
    fields: dict[str, Any] = dict(
        mail_from=mail_from,
        rcpt_tos=tuple(rcpt_tos),
        subject=subject,
        sender=sender.lower() if sender.isascii() else sender,
        headers=MappingProxyType(headers),
        authentication_results=headers.get("authentication-results", ()),
        message_id=message_ids[0].strip() if message_ids else None,
    )

    def extract() -> str:
        return _extract_body(raw, head, max_depth, max_body)
    if defer_body:
        return MessageView._body_on_first_read(extract, **fields)
    return MessageView(body=extract(), **fields)


def body_requested(view: MessageView) -> bool:
    """True once a view built with ``defer_body`` has been asked for its body."""
    return "_body_requested" in vars(view)


def parse_head(raw: bytes) -> Message:
    """The header block of ``raw`` (all of it when it has no empty line), parsed without the body."""
    end = raw.find(b"\r\n\r\n")
    return BytesParser(policy=policy.default).parsebytes(raw if end < 0 else raw[:end + 4], headersonly=True)


def parse(raw: bytes, *, whole: bool = False, head: Message | None = None) -> Message:
    """``raw`` parsed with ``email.policy.default``.

    email's parser reads every body line in Python (about 3 ms for 100 KB);
    a body that is one part (not ``multipart/*`` or ``message/*``) is handed
    over whole to ``head`` (:func:`parse_head` of ``raw``, parsed again when
    not given) instead, giving the same message. ``whole`` forces the full
    parse.
    """
    end = raw.find(b"\r\n\r\n")
    if whole or end < 0:
        return BytesParser(policy=policy.default).parsebytes(raw)
    if head is None:
        head = parse_head(raw)
    if head.get_payload() or head.get_content_maintype() in ("multipart", "message"):
        return BytesParser(policy=policy.default).parsebytes(raw)
    head.set_payload(raw[end + 4:].decode("ascii", "surrogateescape"))
    return head


def _extract_body(raw: bytes, head: Message | None, max_depth: int, limit: int) -> str:
    try:
        return _body(parse(raw, head=head), max_depth, limit)[:limit]
    except Exception:
        return _fallback_body(raw)[:limit]


def _headers(message: Message) -> dict[str, tuple[str, ...]]:
    collected: dict[str, list[str]] = {}
    for name, raw_value in message.raw_items():
        collected.setdefault(str(name).lower(), []).append(_decode_header(str(raw_value)))
    return {name: tuple(values) for name, values in collected.items()}


def _decode_header(raw: str) -> str:
    unfolded = " ".join(raw.replace("\r", " ").replace("\n", " ").split())
    try:
        decoded = str(make_header(decode_header(unfolded)))
    except Exception:
        decoded = unfolded
    return _CONTROL.sub("", decoded.replace("\t", " "))


def _body(message: Message, max_depth: int, limit: int) -> str:
    plain, html = _first_text_parts(message, max_depth)
    if plain is not None:
        return _clean_start(_decode_part(plain), limit)
    if html is not None:
        return _clean_start(_strip_html(_decode_part(html)), limit)
    return ""


def _clean_start(text: str, limit: int) -> str:
    """``_clean(text)[:limit]``, cleaning little more than ``limit`` characters of a long text.

    Cleaning only drops characters and merges line breaks with their
    neighbours, so a cleaned start of the text is a start of the cleaned
    whole up to its last non-blank character (only the trailing blanks that
    ``strip`` removes can differ). When it is longer than ``limit``, its first
    ``limit`` characters are the answer; otherwise the whole text is cleaned.
    """
    start = limit + limit // 8
    if len(text) > start:
        cleaned = _clean(text[:start])
        if len(cleaned) >= limit:
            return cleaned[:limit]
    return _clean(text)[:limit]


def _first_text_parts(message: Message, max_depth: int) -> tuple[Message | None, Message | None]:
    """Depth-first, in order; attachments and nested messages are not the body."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    html: Message | None = None
    while stack:
        part, depth = stack.pop()
        content_type = part.get_content_type()
        if part.is_multipart():
            if depth >= max_depth or content_type == "message/rfc822":
                continue
            children = part.get_payload()
            if isinstance(children, list):
                stack.extend((child, depth + 1) for child in reversed(children) if isinstance(child, Message))
            continue
        if _is_attachment(part):
            continue
        if content_type == "text/plain":
            return part, html
        if content_type == "text/html" and html is None:
            html = part
    return None, html


def _is_attachment(part: Message) -> bool:
    disposition = str(part.get("content-disposition", "")).split(";", 1)[0].strip().lower()
    return disposition == "attachment"


def _decode_part(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        codecs.lookup(charset)
    except (LookupError, ValueError):
        charset = "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except Exception:
        return payload.decode("utf-8", errors="replace")


def _clean(text: str) -> str:
    """LF line ends, no control characters, at most one blank line in a row.

    Done on the UTF-8 bytes, where ``translate`` deletes the control bytes in
    one C pass (they never occur inside a multi-byte sequence): regular
    expressions over a 100 KB body cost the router about a millisecond.
    """
    data = text.encode("utf-8", "surrogatepass")
    if b"\r" in data:
        data = b"\n".join(data.splitlines())  # CRLF, CR and LF alike; a final break goes, as strip() would
    text = data.translate(None, _CONTROL_BYTES).decode("utf-8", "surrogatepass")
    return (_BLANK_LINES.sub("\n\n", text) if "\n\n\n" in text else text).strip()


class _TextExtractor(HTMLParser):
    """Keeps the visible text of an HTML body; script and style contents are dropped."""

    _SKIP = frozenset({"script", "style", "head", "title"})
    _BREAK = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BREAK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def _strip_html(html: str) -> str:
    extractor = _TextExtractor()
    try:
        extractor.feed(html)
        extractor.close()
    except Exception:
        return re.sub(r"<[^>]*>", " ", html)
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).split("\n"))
    return "\n".join(lines)


def _fallback_headers(raw: bytes) -> dict[str, tuple[str, ...]]:
    """Headers split by hand when the parser itself gave up."""
    head = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").partition("\n\n")[0]
    collected: dict[str, list[str]] = {}
    last: str | None = None
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and last is not None:
            collected[last][-1] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            last = name.strip().lower()
            collected.setdefault(last, []).append(value.strip())
    return {name: tuple(_decode_header(v) for v in values) for name, values in collected.items()}


def _fallback_body(raw: bytes) -> str:
    """Everything after the header block, when the parser gave up on it (e.g. recursion on hostile MIME)."""
    return _clean(raw.decode("utf-8", errors="replace").replace("\r\n", "\n").partition("\n\n")[2])
