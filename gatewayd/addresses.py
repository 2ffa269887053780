"""Strict e-mail address handling of our own.

Python 3.11.7's ``email.utils`` mis-parses hostile input (CVE-2023-27043:
``alice@example.org)<bob@example.org>`` comes out as bob), so every address
gatewayd *acts on* — a recipient it sends to, a participant it threads by — goes
through :func:`parse_mailbox` or :func:`extract_address`, which accept only a
plain ``local@domain`` or a single ``Display Name <local@domain>`` and refuse
anything ambiguous.
"""

from __future__ import annotations

import re
from email.header import decode_header, make_header

MAX_ADDRESS = 254

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[0-9A-Fa-f:.]+\]"
_ADDR_SPEC = re.compile(rf"^(?P<local>{_DOT_ATOM}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})$")
_UTF8_ADDR_SPEC = re.compile(r"^(?P<local>[^\s@\"()<>\[\]\\,;:\x00-\x1f\x7f]+)@(?P<domain>[^\s@\"()<>\[\]\\,;:\x00-\x1f\x7f]+)$")
_NAME_ADDR = re.compile(r'^\s*(?P<name>(?:"(?:[^"\\\r\n]|\\.)*"|[^<>"@,;:()\r\n]*?))\s*<(?P<addr>[^<>\s]+)>\s*$')


class AddressError(ValueError):
    """An address gatewayd refuses to act on."""


_FOLD = re.compile(r"\r\n(?=[ \t])")


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def has_control(text: str) -> bool:
    """C0 and C1 control characters and the Unicode line/paragraph separators."""
    return _CONTROL.search(text) is not None


def parse_mailbox(text: str, *, utf8: bool = False) -> str:
    """Validates a bare ``local@domain`` and returns it with the domain lower-cased.

    ``utf8`` admits RFC 6531 internationalised addresses (only with SMTPUTF8).
    """
    if has_control(text):
        raise AddressError("address contains control characters")
    if len(text) > MAX_ADDRESS:
        raise AddressError("address is longer than 254 characters")
    match = _ADDR_SPEC.match(text)
    if match is None and utf8 and not text.isascii():
        match = _UTF8_ADDR_SPEC.match(text)
    if match is None:
        raise AddressError(f"{text!r} is not a valid address (expected local@domain)")
    return f"{match['local']}@{match['domain'].lower()}"


def extract_address(header_value: str) -> str | None:
    """The one mailbox in a ``From``/``Reply-To``/``Sender`` value, or None if not exactly one clean one.

    Only ``addr``, ``<addr>`` and ``Name <addr>`` are accepted: comments, groups,
    several addresses and stray brackets all return None, so a crafted header can
    never make gatewayd act on a second, hidden address.
    """
    # Only folding (CRLF + space/tab) and tabs count as whitespace here: str.split()
    # would also swallow \x1c-\x1f, \x0b, \x85 and U+2028, hiding control characters.
    unfolded = _FOLD.sub("", header_value).replace("\t", " ").strip(" \r\n")
    if not unfolded or has_control(unfolded):
        return None
    value = re.sub(" +", " ", unfolded).strip()
    try:
        return parse_mailbox(value)
    except AddressError:
        pass
    match = _NAME_ADDR.match(value)
    if match is None:
        return None
    try:
        return parse_mailbox(match["addr"])
    except AddressError:
        return None


def display_name(header_value: str) -> str:
    """The decoded display name of a ``Name <addr>`` value, stripped of control characters."""
    value = " ".join(header_value.split())
    match = _NAME_ADDR.match(value)
    if match is None:
        return ""
    name = match["name"].strip()
    if name.startswith('"') and name.endswith('"') and len(name) >= 2:
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    try:
        name = str(make_header(decode_header(name)))
    except (UnicodeDecodeError, LookupError, ValueError):
        pass
    return "".join(c for c in name if not (ord(c) < 32 or ord(c) == 127)).strip()

