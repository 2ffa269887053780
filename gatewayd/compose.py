"""Building what gatewayd sends: forwards are the original bytes plus our headers on top.

A forward is never re-encoded. gatewayd prepends its own header fields; where
one of them replaces a field the original has (``Subject``, ``Message-ID``,
``References``, ``Reply-To``), the original is kept, renamed to
``X-Original-<Name>``, so a message carries each of those fields once. The
new ``Subject`` reuses the original's raw bytes behind the tag, so no decoded
customer text ever ends up in a header gatewayd writes (CVE-2024-6923).

gatewayd's ``Authentication-Results`` goes on top too; any field in the
original claiming the same authserv-id is a forgery and is left out.
"""

from __future__ import annotations

import re

from .ids import TicketIds, message_ids
from .rawmessage import CRLF, decoded_text, fields, header_block, unfold

_REPLACEABLE = frozenset({"subject", "message-id", "references", "reply-to", "in-reply-to"})
_MAX_LINE = 900
_RFC_LINE = 998


def header(name: str, value: str | bytes) -> bytes:
    """One header field from trusted parts; refuses CR/LF so a caller can't inject a second field."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8")
    if b"\r" in raw.replace(b"\r\n ", b"").replace(b"\r\n\t", b"") or b"\n" in raw.replace(b"\r\n", b""):
        raise ValueError(f"header {name} contains a line break")
    return name.encode("ascii") + b": " + raw + CRLF


def ascii_text(text: str, limit: int = _MAX_LINE) -> str:
    """Printable ASCII only, for values built from config names and trace summaries."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:limit]


def fold_ids(ids: list[str]) -> bytes:
    """Message IDs one per continuation line, so long References never exceed the line limit."""
    return b"\r\n ".join(i.encode("ascii", "replace") for i in ids)


def forward_head(ids: TicketIds, number: int, raw: bytes, *, agent: str, message_id: str,
                 route_summary: str, reply_to: str | None = None,
                 authentication_results: str | None = None) -> bytes:
    """gatewayd's header fields for the forward of ``raw`` on ticket ``number`` to ``agent``.

    ``reply_to`` is the agent's signed reply address, so the answer comes back
    through gatewayd instead of going straight to the customer.
    """
    block = header_block(raw)
    original: dict[str, bytes] = {}
    for f in fields(block):
        original.setdefault(f.name, f.raw.partition(b":")[2])
    head = [
        *([header("Authentication-Results", authentication_results)] if authentication_results else []),
        header("X-Gatewayd-Ticket", ids.ref(number)),
        header("X-Gatewayd-Agent", ascii_text(agent)),
        header("X-Gatewayd-Route", ascii_text(route_summary) or "-"),
        header("Message-ID", message_id),
    ]
    if reply_to is not None:
        head.append(header("Reply-To", reply_to))
    refs = message_ids(unfold(original.get("references", b"")).decode("ascii", "replace"))
    own_id = message_ids(unfold(original.get("message-id", b"")).decode("ascii", "replace"))
    chain = [r for r in refs + own_id[:1] if r != ids.pseudo_reference(number)][-20:]
    head.append(header("References", fold_ids(chain + [ids.pseudo_reference(number)])))
    subject = original.get("subject")
    if subject is None:
        head.append(header("Subject", ids.tag(number)))
    elif number not in ids.tags_in(decoded_text(unfold(subject).decode("utf-8", "surrogateescape"))):
        tagged = b"Subject: " + ids.tag(number).encode()
        rest = subject.lstrip(b" \t")
        first_line = len(tagged) + 1 + len(rest.split(CRLF, 1)[0])
        # Fold rather than push the original's first line past the RFC 5322 limit.
        head.append(tagged + (b"\r\n " if first_line > _RFC_LINE else b" ") + rest + CRLF)
    return b"".join(head)


def authserv_id(value: str) -> str:
    """The authserv-id of an ``Authentication-Results`` value (RFC 8601 § 2.2), lower-cased."""
    match = re.match(r"\s*(?:\([^()]*\)\s*)*([^\s;()]+)", value)
    return match.group(1).lower() if match else ""


def assemble(head: bytes, raw: bytes) -> bytes:
    """The bytes to send: ``head``, then ``raw`` with every field ``head`` replaces renamed.

    ``Authentication-Results`` fields of ``raw`` naming the authserv-id of the
    one in ``head`` are dropped, continuation lines included.
    """
    head_fields = list(fields(head))
    replaced = {f.name for f in head_fields} & _REPLACEABLE
    ours = {authserv_id(f.value) for f in head_fields if f.name == "authentication-results"}
    if not replaced and not ours:
        return head + raw
    block = header_block(raw)
    if not block:
        return head + raw
    groups: list[list[bytes]] = []
    for line in block[:-2].split(CRLF) if block.endswith(CRLF) else block.split(CRLF):
        if line[:1] in (b" ", b"\t") and groups:
            groups[-1].append(line)
        else:
            groups.append([line])
    out: list[bytes] = []
    for group in groups:
        line = group[0]
        match = re.match(rb"^([\x21-\x39\x3b-\x7e]+)([ \t]*:)", line)
        name = match.group(1).decode("ascii").lower() if match else ""
        if name == "authentication-results" and ours:
            value = unfold(CRLF.join(group)).partition(b":")[2].decode("utf-8", "replace")
            if authserv_id(value) in ours:
                continue
        if match and name in replaced:
            line = b"X-Original-" + line
            if len(line) > _RFC_LINE:
                # The rename made the line longer: fold right after the colon (FWS may open any of these fields).
                name_end = match.end() + len(b"X-Original-")
                line = line[:name_end] + b"\r\n" + (b"" if line[name_end:name_end + 1] in (b" ", b"\t") else b" ") \
                    + line[name_end:]
        out.append(line)
        out.extend(group[1:])
    # raw[len(block):] is the blank line and body, or nothing for a message that has no body.
    return head + CRLF.join(out) + CRLF + raw[len(block):]
