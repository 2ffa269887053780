"""Ticket IDs and gatewayd's own Message-IDs.

Every message gatewayd sends carries a Message-ID of the form
``<SUP-1042.k3j9x2.8f1c0a2b9e@gw.example.test>``: the ticket, a random nonce
and an HMAC over both keyed by ``support.reply_secret``. A reply whose
``In-Reply-To``/``References`` names such an ID threads onto that ticket from
any sender, because nobody without the secret can mint one. The short
pseudo-reference ``<SUP-1042@gw.example.test>`` rides along so mail clients
group the whole conversation; it carries no MAC, so it only threads mail from
people already on the ticket.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_MAC_LEN = 16


@dataclass(frozen=True)
class TicketIds:
    prefix: str
    hostname: str
    secret: bytes

    def ref(self, number: int) -> str:
        return f"{self.prefix}-{number}"

    def number(self, ref: str) -> int | None:
        match = re.fullmatch(rf"{re.escape(self.prefix)}-(\d{{1,12}})", ref)
        return int(match.group(1)) if match else None

    def tag(self, number: int) -> str:
        return f"[{self.ref(number)}]"

    def tags_in(self, subject: str) -> list[int]:
        """Ticket numbers tagged ``[SUP-1042]`` in a subject, in order of appearance."""
        return [int(n) for n in re.findall(rf"\[{re.escape(self.prefix)}-(\d{{1,12}})\]", subject)]

    def pseudo_reference(self, number: int) -> str:
        return f"<{self.ref(number)}@{self.hostname}>"

    def _mac(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()[:_MAC_LEN]

    def message_id(self, number: int) -> str:
        body = f"{self.ref(number)}.{secrets.token_hex(6)}"
        return f"<{body}.{self._mac(body)}@{self.hostname}>"

    def ticket_of_message_id(self, message_id: str) -> int | None:
        """The ticket number of one of our own signed Message-IDs, else None."""
        pattern = rf"<({re.escape(self.prefix)}-(\d{{1,12}})\.[0-9a-f]{{12}})\.([0-9a-f]{{{_MAC_LEN}}})@{re.escape(self.hostname)}>"
        match = re.fullmatch(pattern, message_id.strip(), re.IGNORECASE)
        if not match or not hmac.compare_digest(self._mac(match.group(1)), match.group(3).lower()):
            return None
        return int(match.group(2))

    def ticket_of_pseudo_reference(self, message_id: str) -> int | None:
        pattern = rf"<{re.escape(self.prefix)}-(\d{{1,12}})@{re.escape(self.hostname)}>"
        match = re.fullmatch(pattern, message_id.strip(), re.IGNORECASE)
        return int(match.group(1)) if match else None


_MSG_ID = re.compile(r"<[^<>\s]{1,250}>")


def message_ids(value: str) -> list[str]:
    """The ``<...>`` message IDs in an ``In-Reply-To``/``References`` value, in order."""
    return _MSG_ID.findall(value)
