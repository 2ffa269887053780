"""What a forward must be, stated independently of gatewayd's code.

A forward is gatewayd's own header fields on top of the accepted bytes, where
each original field that gatewayd's fields replace (Subject, Message-ID,
References, Reply-To, In-Reply-To) is kept, renamed ``X-Original-<Name>``.
:func:`is_forward_of` checks exactly that and allows nothing else.
"""

from __future__ import annotations

import re

# Fields gatewayd may write on top of a forward, each at most once.
_OWN = frozenset({b"x-gatewayd-ticket", b"x-gatewayd-agent", b"x-gatewayd-route", b"authentication-results",
                  b"message-id", b"references", b"reply-to", b"in-reply-to", b"subject"})
_REPLACEABLE = frozenset({b"subject", b"message-id", b"references", b"reply-to", b"in-reply-to"})
_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def _fields(lines: list[bytes]) -> list[list[bytes]]:
    """Groups header lines into fields (a field line plus its continuation lines)."""
    grouped: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and grouped:
            grouped[-1].append(line)
        else:
            grouped.append([line])
    return grouped


def _name(field: list[bytes]) -> bytes | None:
    match = _NAME.match(field[0])
    return match.group(1).lower() if match else None


def renamed(accepted: bytes, names: set[bytes]) -> bytes:
    """``accepted`` with each header line that opens a field in ``names`` prefixed ``X-Original-``."""
    if accepted.startswith(b"\r\n"):
        return accepted
    end = accepted.find(b"\r\n\r\n")
    block, tail = (accepted, b"") if end < 0 else (accepted[:end], accepted[end:])
    lines = []
    for line in block.split(b"\r\n"):
        match = _NAME.match(line)
        lines.append(b"X-Original-" + line if match and match.group(1).lower() in names else line)
    return b"\r\n".join(lines) + tail


def is_forward_of(forward: bytes, accepted: bytes) -> bool:
    """True when ``forward`` is gatewayd's fields on top of ``accepted`` with the replaced fields renamed."""
    lines = forward.split(b"\r\n")
    seen: set[bytes] = set()
    used = 0
    for field in _fields(lines):
        name = _name(field)
        if name not in _OWN or name in seen:
            return False
        seen.add(name)
        used += len(field)
        if b"x-gatewayd-ticket" in seen and b"\r\n".join(lines[used:]) == renamed(accepted, seen & _REPLACEABLE):
            return True
    return False
