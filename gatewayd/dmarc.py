"""DMARC (RFC 7489) on inbound mail, DKIM-only: gatewayd does no SPF.

After DKIM verification, :func:`evaluate` looks up ``_dmarc.<From domain>``
with the same ``dnsfunc`` (and per-lookup timeout) as the DKIM verifier, and
runs in the same worker thread under the same overall deadline
(:meth:`gatewayd.dkim.Verifier.check`). The outcome:

* ``pass``: a DKIM signature that verified has a ``d=`` aligned with the From
  domain (``adkim=s``: the same name; ``adkim=r``, the default: the same name
  or one a subdomain of the other, on a label boundary);
* ``fail``: a DMARC record exists and no verified signature is aligned;
* ``none``: no DMARC record;
* ``temperror``: the lookup failed (timeout, SERVFAIL, unreachable resolver);
* ``permerror``: no single usable From domain to evaluate.

Known simplifications, deliberately conservative:

* There is no Public Suffix List here. If the From domain has no record, the
  fallback asks only the last two labels (``mail.example.org`` ->
  ``example.org``); for a domain under a multi-label public suffix
  (``mail.example.co.uk``) that asks ``co.uk`` and so misses the real
  organizational policy, giving ``none`` (never a false ``fail``).
* For the same reason relaxed alignment is a suffix match, not "same
  organizational domain": ``d=example.org`` aligns with ``From:
  x@mail.example.org`` and vice versa, but two sibling subdomains
  (``a.example.org`` / ``b.example.org``) do not. Using "last two labels" as
  the organizational domain would let ``d=evil.co.uk`` pass for ``bank.co.uk``.
* ``pct=`` is not applied (the policy counts for every message), and only the
  first TXT string set the resolver returns is examined.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .addresses import extract_address
from .rawmessage import fields, header_block

DnsFunc = Callable[..., bytes | None]

POLICIES = frozenset({"none", "quarantine", "reject"})
# Policies under which a DMARC fail counts as unauthenticated mail.
ENFORCED = frozenset({"quarantine", "reject"})
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")


@dataclass(frozen=True)
class Record:
    policy: str  # none | quarantine | reject
    subdomain_policy: str | None
    adkim: str  # r | s


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass | fail | none | temperror | permerror
    domain: str | None = None  # the RFC 5322.From domain (validated)
    policy: str | None = None  # the policy that applies to ``domain``, when a record was found
    reason: str = ""

    @property
    def enforced_fail(self) -> bool:
        """A DMARC fail the domain owner asks receivers to act on (p=quarantine or p=reject)."""
        return self.result == "fail" and self.policy in ENFORCED

    def header_part(self) -> str:
        text = f"dmarc={self.result}"
        comment = " ".join(x for x in (f"p={self.policy}" if self.policy else "", _reason(self.reason)) if x)
        if comment:
            text += f" ({comment})"
        if self.domain:
            text += f" header.from={self.domain}"
        return text

    def to_json(self) -> dict[str, object]:
        return {"result": self.result, "domain": self.domain, "policy": self.policy, "reason": self.reason}

    @classmethod
    def from_json(cls, data: object) -> "DmarcResult | None":
        if not isinstance(data, dict):
            return None
        domain, policy = data.get("domain"), data.get("policy")
        return cls(str(data.get("result", "none")), domain if isinstance(domain, str) else None,
                   policy if isinstance(policy, str) else None, str(data.get("reason", "")))


def _reason(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9 .,:_-]", "", text)[:80]


def parse_record(text: bytes | str | None) -> Record | None:
    """A ``v=DMARC1`` record's policy tags; None if ``text`` is not a DMARC record."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    tags: dict[str, str] = {}
    order: list[str] = []
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if not sep:
            continue
        name = name.strip().lower()
        order.append(name)
        tags.setdefault(name, value.strip())
    if not order or order[0] != "v" or tags["v"].upper() != "DMARC1":
        return None
    policy = tags.get("p", "").lower()
    subdomain = tags.get("sp", "").lower()
    return Record(policy if policy in POLICIES else "none",
                  subdomain if subdomain in POLICIES else None,
                  "s" if tags.get("adkim", "r").lower() == "s" else "r")


def from_domain(message: bytes) -> str | None:
    """The domain of the single From address, lower-cased and checked to be a DNS name; else None."""
    block = header_block(message)
    found = [f for f in fields(block) if f.name == "from"]
    if len(found) != 1:
        return None
    address = extract_address(found[0].value)
    if not address:
        return None
    domain = address.rpartition("@")[2].lower().rstrip(".")
    return domain if _NAME.match(domain) and len(domain) <= 253 else None


def aligned(d: str, domain: str, mode: str) -> bool:
    """Whether a signing domain ``d`` is aligned with the From ``domain`` (see the module notes)."""
    d, domain = d.lower().rstrip("."), domain.lower().rstrip(".")
    if d == domain:
        return True
    if mode == "s" or d.count(".") < 1:
        return False
    return domain.endswith("." + d) or d.endswith("." + domain)


class NotCached(Exception):
    """A cache-only lookup found nothing: the answer needs the network (and a worker thread)."""


def _lookup(name: str, dnsfunc: DnsFunc, timeout: float) -> Record | None:
    return parse_record(dnsfunc(f"_dmarc.{name}.".encode("ascii"), timeout=timeout))


def evaluate(message: bytes, pass_domains: frozenset[str], dnsfunc: DnsFunc, timeout: float) -> DmarcResult:
    """The DMARC result for ``message`` given the ``d=`` of its verified signatures; blocking."""
    domain = from_domain(message)
    if domain is None:
        return DmarcResult("permerror", None, None, "no single valid From domain")
    try:
        record = _lookup(domain, dnsfunc, timeout)
        policy = record.policy if record else None
        if record is None:
            organizational = ".".join(domain.split(".")[-2:])
            if organizational != domain:
                record = _lookup(organizational, dnsfunc, timeout)
                policy = record and (record.subdomain_policy or record.policy)
    except NotCached:
        raise
    except Exception as exc:  # noqa: BLE001 - any resolver trouble is temporary, never a lost message
        return DmarcResult("temperror", domain, None, f"DNS: {type(exc).__name__} {exc}".strip())
    if record is None:
        return DmarcResult("none", domain)
    if any(aligned(d, domain, record.adkim) for d in pass_domains):
        return DmarcResult("pass", domain, policy)
    return DmarcResult("fail", domain, policy, "no aligned DKIM signature")
