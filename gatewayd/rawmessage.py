"""Byte-level view of a received message: the header block as the client sent it.

Intake decides everything it must decide before the ``250`` (threading, loops,
size of the header block) from these raw fields. Nothing here re-encodes or
rebuilds a header, which is what keeps forwards byte-identical to what was
accepted and keeps decoded customer text out of headers gatewayd writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header

CRLF = b"\r\n"
_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


@dataclass(frozen=True)
class RawField:
    name: str
    raw: bytes

    @property
    def value(self) -> str:
        """The unfolded value, bytes outside ASCII kept via surrogateescape."""
        _, _, value = self.raw.partition(b":")
        return unfold(value).decode("utf-8", "surrogateescape").strip()


def unfold(value: bytes) -> bytes:
    return re.sub(rb"\r\n(?=[ \t])", b"", value).rstrip(b"\r\n")


def header_block(data: bytes) -> bytes:
    """The header block including its final CRLF; a message without a blank line is all headers.

    The body is ``data[len(block) + 2:]``; nothing here copies it.
    """
    if data.startswith(CRLF):
        return b""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def fields(block: bytes) -> Iterator[RawField]:
    """Each header field with its folded raw bytes (without the final CRLF).

    Lines that are neither a field nor a continuation are skipped: they are
    kept in the stored bytes but gatewayd never interprets them.
    """
    current: list[bytes] = []
    name = ""
    for line in block.split(CRLF):
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
            continue
        if current:
            yield RawField(name, CRLF.join(current))
            current = []
        match = _FIELD_NAME.match(line)
        if match:
            name = match.group(1).decode("ascii").lower()
            current = [line]
    if current:
        yield RawField(name, CRLF.join(current))


@dataclass(frozen=True)
class HeaderSummary:
    """The few header facts intake needs before it answers."""

    message_id: str | None
    in_reply_to: str
    references: str
    subject: str
    from_: str
    reply_to: str
    received_count: int
    gatewayd_ticket_count: int
    header_size: int

    @classmethod
    def of(cls, data: bytes) -> "HeaderSummary":
        block = header_block(data)
        first: dict[str, str] = {}
        received = own = 0
        for f in fields(block):
            if f.name == "received":
                received += 1
            elif f.name == "x-gatewayd-ticket":
                own += 1
            elif f.name not in first:
                # Bytes that are not UTF-8 become U+FFFD: these values are stored and bound
                # into SQL, which refuses the lone surrogates of surrogateescape.
                first[f.name] = f.value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        message_id = first.get("message-id", "").strip() or None
        return cls(
            message_id=message_id[:998] if message_id else None,
            in_reply_to=first.get("in-reply-to", ""),
            references=first.get("references", ""),
            subject=first.get("subject", ""),
            from_=first.get("from", ""),
            reply_to=first.get("reply-to", ""),
            received_count=received,
            gatewayd_ticket_count=own,
            header_size=len(block),
        )


def decoded_text(value: str, limit: int = 998) -> str:
    """RFC 2047-decoded header text for display and storage, never for writing headers.

    Control characters (an encoded CR/LF included, CVE-2024-6923) become spaces.
    """
    try:
        text = str(make_header(decode_header(value)))
    except (UnicodeDecodeError, LookupError, ValueError, AssertionError):
        text = value
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return " ".join(text.split())[:limit]


def has_bare_newline(data: bytes) -> bool:
    """True when a CR or LF appears other than as a CRLF pair, or a NUL is present.

    ``splitlines`` breaks at CRLF, CR and LF alike, so joining its lines with
    CRLF gives ``data`` back exactly when every break was a CRLF: one pass and
    a compare, where counting CRLF, CR and LF took three slower ones.
    """
    if b"\x00" in data:
        return True
    rejoined = CRLF.join(data.splitlines())
    return rejoined != data and rejoined + CRLF != data


def normalize_newlines(data: bytes) -> bytes:
    """Every bare CR, bare LF and CRLF becomes CRLF; NUL bytes are removed."""
    return re.sub(rb"\r\n|\r|\n", CRLF, data.replace(b"\x00", b""))

