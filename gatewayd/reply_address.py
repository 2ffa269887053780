"""Signed reply addresses: ``support+<token>@<support domain>``.

The token names the ticket and who the address was given to (one agent, or the
customer) and carries a truncated HMAC keyed by ``support.reply_secret``. Only
gatewayd can mint one, so a verified token is proof that the sender was handed
that address by gatewayd: the listener accepts mail for it, anything else with
a ``+`` is ``550 5.1.1`` like any unknown mailbox.

Layout: ``<ticket>.<role>[.<agent>].<mac>`` with role ``a`` (agent) or ``c``
(customer). Everything is lower case, because MTAs and users fold local parts.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Literal

_MAC_LEN = 20  # 80 bits: forging by guessing is out of reach, the address stays short
_CONTEXT = b"gatewayd reply address v1\x00"  # keeps these MACs apart from the Message-ID ones
_TOKEN = re.compile(r"^(\d{1,12})\.(a|c)(?:\.([a-z0-9][a-z0-9_.-]{0,63}))?\.([0-9a-f]{%d})$" % _MAC_LEN)

Role = Literal["agent", "customer"]


@dataclass(frozen=True)
class ReplyToken:
    """A verified reply address: the ticket and whom it was given to."""

    ticket: int
    role: Role
    agent: str | None


@dataclass(frozen=True)
class ReplyAddresses:
    """Mints and verifies reply addresses below the support addresses."""

    support_addresses: tuple[str, ...]
    secret: bytes

    @property
    def base(self) -> tuple[str, str]:
        local, _, domain = self.support_addresses[0].lower().rpartition("@")
        return local, domain

    def _mac(self, text: str) -> str:
        return hmac.new(self.secret, _CONTEXT + text.encode("ascii"), hashlib.sha256).hexdigest()[:_MAC_LEN]

    def _mint(self, body: str) -> str:
        local, domain = self.base
        return f"{local}+{body}.{self._mac(body)}@{domain}"

    def for_agent(self, ticket: int, agent: str) -> str:
        """The ``Reply-To`` of a forward: the agent's answer comes back through gatewayd."""
        return self._mint(f"{ticket}.a.{agent.lower()}")

    def for_customer(self, ticket: int) -> str:
        """The ``Reply-To`` of customer-facing mail: threads even when the subject tag is stripped."""
        return self._mint(f"{ticket}.c")

    def verify(self, address: str) -> ReplyToken | None:
        """The token of one of our reply addresses, or None (unknown base, bad syntax or MAC)."""
        local, at, domain = address.strip().lower().rpartition("@")
        base, plus, token = local.partition("+")
        if not at or not plus or f"{base}@{domain}" not in self.support_addresses:
            return None
        match = _TOKEN.match(token)
        if match is None:
            return None
        number, role, agent, mac = match.groups()
        if (role == "a") != (agent is not None):
            return None
        body = token[: -(_MAC_LEN + 1)]
        if not hmac.compare_digest(self._mac(body), mac):
            return None
        return ReplyToken(int(number), "agent" if role == "a" else "customer", agent)


def reply_addresses(support_addresses: tuple[str, ...], secret: str) -> ReplyAddresses:
    return ReplyAddresses(tuple(a.lower() for a in support_addresses), secret.encode("utf-8"))
