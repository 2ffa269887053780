"""DKIM with dkimpy: signing what gatewayd originates, verifying what it receives.

Both are CPU and (for verification) DNS work, so callers run them off the event
loop (:func:`asyncio.to_thread`). Verification is bounded twice: every DNS
lookup has the configured timeout, and :meth:`Verifier.check` gives up on the
whole message after a deadline; a DNS problem is ``temperror``, never an
exception and never a lost message.

Signatures are relaxed/relaxed, rsa-sha256 (or ed25519-sha256), with ``From``
signed once more than it occurs (oversigned, so nobody can add a second From)
and no ``l=`` tag (so nothing can be appended to a signed body).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import dkim
import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from .dmarc import DmarcResult, NotCached, evaluate as evaluate_dmarc, from_domain
from .rawmessage import fields, header_block

if TYPE_CHECKING:
    from .config import DkimConfig, DnsConfig

DnsFunc = Callable[..., bytes | None]

# Header fields gatewayd signs when the message has them; From is listed twice (oversigned).
SIGNED_HEADERS = ("from", "to", "cc", "reply-to", "subject", "date", "message-id", "in-reply-to",
                  "references", "mime-version", "content-type", "content-transfer-encoding",
                  "auto-submitted", "x-auto-response-suppress", "x-gatewayd-ticket")
_SIGNED_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$")

_VERIFY_THREADS = 16
_CACHE_ENTRIES = 10_000


class DnsTemporaryError(Exception):
    """A lookup that may succeed later (timeout, SERVFAIL, unreachable resolver).

    Deliberately not dkimpy's own DnsTimeoutError, which dkimpy turns into a
    plain failed verification.
    """


# --------------------------------------------------------------------------- keys


def load_private_key(path: Path, algorithm: str) -> bytes:
    """The key file's contents, checked to be a usable key for ``algorithm``; ValueError otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist (create it with: gatewayd dkim keygen)") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if algorithm == "ed25519-sha256":
        try:
            import nacl.signing
        except ImportError:
            raise ValueError("ed25519-sha256 needs PyNaCl: pip install 'gatewayd[ed25519]'") from None
        try:
            nacl.signing.SigningKey(base64.b64decode(data.strip(), validate=True))
        except (ValueError, TypeError, nacl.exceptions.CryptoError):
            raise ValueError(f"{path} is not a base64 ed25519 private key") from None
        return data.strip()
    try:
        dkim.crypto.parse_pem_private_key(data)
    except (dkim.crypto.UnparsableKeyError, ValueError, IndexError, TypeError):
        raise ValueError(f"{path} is not a PEM RSA private key") from None
    return data


@dataclass(frozen=True)
class GeneratedKey:
    private: bytes
    txt: str

    def record(self, selector: str, domain: str) -> str:
        """The DNS TXT record to publish, in zone-file syntax, split into 255-byte strings."""
        chunks = [self.txt[i:i + 255] for i in range(0, len(self.txt), 255)]
        quoted = " ".join(f'"{c}"' for c in chunks)
        return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def generate_key(algorithm: str = "rsa-sha256", bits: int = 2048) -> GeneratedKey:
    """A fresh private key (PEM for RSA, base64 for ed25519) and its ``v=DKIM1`` TXT value."""
    if algorithm == "ed25519-sha256":
        import nacl.signing

        signing = nacl.signing.SigningKey.generate()
        public = base64.b64encode(bytes(signing.verify_key)).decode()
        return GeneratedKey(base64.b64encode(bytes(signing)) + b"\n", f"v=DKIM1; k=ed25519; p={public}")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return GeneratedKey(private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}")


# --------------------------------------------------------------------------- signing


@dataclass(frozen=True)
class Signer:
    domain: str
    selector: str
    algorithm: str
    key: bytes

    @classmethod
    def from_config(cls, config: "DkimConfig") -> "Signer":
        return cls(config.domain, config.selector, config.algorithm,
                   load_private_key(config.key_file, config.algorithm))

    def sign(self, message: bytes) -> bytes:
        """``message`` with a DKIM-Signature on top; blocking, call it in a thread."""
        block = header_block(message)
        present = [f.name for f in fields(block)]
        names = [n for n in SIGNED_HEADERS if n in present] + ["from"]
        signature = dkim.DKIM(message).sign(
            self.selector.encode(), self.domain.encode(), self.key,
            signature_algorithm=self.algorithm.encode(), canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[n.encode() for n in names], length=False)
        return signature + message


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class SignatureResult:
    result: str  # pass | fail | permerror | temperror
    domain: str | None
    selector: str | None
    b: str | None
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    """The DKIM outcome of one inbound message (``pass`` if any signature holds), and its DMARC result.

    ``dmarc`` is None for verdicts stored before DMARC was evaluated.
    """

    results: tuple[SignatureResult, ...] = ()
    verdict: str = "none"
    detail: str = ""
    dmarc: DmarcResult | None = None

    @property
    def failed(self) -> bool:
        """Signed, and no signature holds for a reason DNS can't excuse."""
        return self.verdict in ("fail", "permerror")

    @property
    def unauthenticated(self) -> bool:
        """What the ``unauthenticated`` policy acts on: DKIM failed, or DMARC failed under p=quarantine|reject."""
        return self.failed or (self.dmarc is not None and self.dmarc.enforced_fail)

    @property
    def pass_domains(self) -> frozenset[str]:
        return frozenset(r.domain for r in self.results if r.result == "pass" and r.domain)

    def header_value(self, authserv_id: str) -> str:
        """The ``Authentication-Results`` value (RFC 8601); only validated tokens from the message."""
        if not self.results:
            reason = f" ({self.detail})" if self.detail else ""
            dmarc = f"; {self.dmarc.header_part()}" if self.dmarc is not None else ""
            return f"{authserv_id}; dkim={self.verdict}{reason}{dmarc}"
        parts = []
        for r in self.results:
            text = f"dkim={r.result}"
            if r.reason:
                text += f" ({r.reason})"
            if r.domain:
                text += f" header.d={r.domain}"
            if r.selector:
                text += f" header.s={r.selector}"
            if r.b:
                text += f" header.b={r.b}"
            parts.append(text)
        if self.dmarc is not None:
            parts.append(self.dmarc.header_part())
        return f"{authserv_id};\r\n " + ";\r\n ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {"verdict": self.verdict, "detail": self.detail,
                "results": [{"result": r.result, "domain": r.domain, "selector": r.selector, "b": r.b,
                             "reason": r.reason} for r in self.results]} | (
            {"dmarc": self.dmarc.to_json()} if self.dmarc is not None else {})

    @classmethod
    def from_json(cls, data: dict[str, object] | None) -> "Verdict":
        if not data:
            return cls()
        results = tuple(SignatureResult(str(r["result"]), r.get("domain"), r.get("selector"), r.get("b"),
                                        str(r.get("reason", "")))
                        for r in data.get("results", ()))  # type: ignore[union-attr]
        return cls(results, str(data.get("verdict", "none")), str(data.get("detail", "")),
                   DmarcResult.from_json(data.get("dmarc")))


def _overall(results: list[SignatureResult]) -> str:
    outcomes = {r.result for r in results}
    for verdict in ("pass", "temperror", "fail", "permerror"):
        if verdict in outcomes:
            return verdict
    return "none"


def _token(value: bytes | None, pattern: re.Pattern[str]) -> str | None:
    text = (value or b"").decode("ascii", "replace").strip()
    return text.lower() if pattern.match(text) and len(text) <= 253 else None


def _short_b(value: bytes | None) -> str | None:
    compact = re.sub(rb"\s+", b"", value or b"")[:8].decode("ascii", "replace")
    return compact if re.fullmatch(r"[A-Za-z0-9+/]{8}", compact) else None


_MAX_SIGNATURES = 5


def verify_blocking(message: bytes, dnsfunc: DnsFunc, timeout: float) -> Verdict:
    """Checks up to five DKIM signatures of ``message``; blocking, call it in a thread."""
    block = header_block(message)
    count = sum(1 for f in fields(block) if f.name == "dkim-signature")
    results: list[SignatureResult] = []
    for index in range(min(count, _MAX_SIGNATURES)):
        checker = dkim.DKIM(message, timeout=timeout, minkey=1024)
        try:
            ok = checker.verify(idx=index, dnsfunc=dnsfunc)
            result, reason = ("pass", "") if ok else ("fail", "signature or key did not verify")
        except DnsTemporaryError as exc:
            result, reason = "temperror", f"DNS: {exc}"
        except dkim.ValidationError as exc:
            result, reason = "fail", "body hash mismatch" if "body hash" in str(exc) else "invalid signature"
        except dkim.DKIMException as exc:
            result, reason = "permerror", type(exc).__name__
        signature = getattr(checker, "signature_fields", None) or {}
        results.append(SignatureResult(
            result, _token(signature.get(b"d"), _SIGNED_NAME), _token(signature.get(b"s"), _SELECTOR),
            _short_b(signature.get(b"b")), _reason(reason)))
    return Verdict(tuple(results), _overall(results))


def _reason(text: str) -> str:
    """Comment text for the header: printable ASCII without parentheses or backslashes."""
    return re.sub(r"[^A-Za-z0-9 .,:_-]", "", text)[:80]


@dataclass(frozen=True)
class Verifier:
    """Inbound DKIM and DMARC checks: ``timeout`` per DNS lookup, ``deadline`` per message.

    The default deadline allows the DKIM key lookup and the two DMARC lookups
    (From domain, then its organizational fallback), plus a second.
    """

    dnsfunc: DnsFunc
    timeout: float
    deadline: float | None = None
    # Threads of its own: sessions waiting on DNS must not queue behind relay
    # sends or plugin hooks in the loop's default pool, nor hold them up.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(_VERIFY_THREADS, thread_name_prefix="gatewayd-verify"),
        compare=False, repr=False)

    @classmethod
    def from_config(cls, dns: "DnsConfig") -> "Verifier":
        return cls(CachingResolver(dns), dns.timeout)

    async def check(self, message: bytes) -> Verdict:
        block = header_block(message)
        signed = any(f.name == "dkim-signature" for f in fields(block))

        def run() -> Verdict:
            verdict = verify_blocking(message, self.dnsfunc, self.timeout) if signed else Verdict()
            return replace(verdict, dmarc=evaluate_dmarc(message, verdict.pass_domains, self.dnsfunc, self.timeout))
        if not signed and isinstance(self.dnsfunc, CachingResolver):
            try:
                return replace(Verdict(), dmarc=evaluate_dmarc(message, frozenset(), self.dnsfunc.cached,
                                                               self.timeout))
            except NotCached:
                pass
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.executor, run),
                                          self.deadline or 3 * self.timeout + 1)
        except asyncio.TimeoutError:
            return Verdict((), "temperror" if signed else "none", "verification timed out" if signed else "",
                           DmarcResult("temperror", from_domain(message), None, "verification timed out"))


class CachingResolver:
    """A dkimpy ``dnsfunc`` on dnspython, aimed at ``dns.resolver`` (or the system's resolver).

    Every message from a domain asks for the same ``_dmarc`` (and often the
    same key) record; answers and NXDOMAINs are kept for their TTL (the SOA
    minimum for negative answers), as a caching resolver would.
    :meth:`cached` answers from that cache alone, so a message whose records
    are known needs no worker thread at all.
    """

    def __init__(self, config: "DnsConfig") -> None:
        if config.resolver is not None:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [config.resolver.host or "127.0.0.1"]
            resolver.port = config.resolver.port or 53
        else:
            resolver = dns.resolver.Resolver()
        resolver.lifetime = config.timeout
        resolver.timeout = config.timeout
        resolver.cache = dns.resolver.LRUCache(_CACHE_ENTRIES)
        self._resolver = resolver
        self._timeout = config.timeout

    def __call__(self, name: bytes, timeout: float | None = None) -> bytes | None:
        """The first TXT string set of ``name``, None when there is none; blocking."""
        lifetime = min(timeout or self._timeout, self._timeout)
        try:
            answer = self._resolver.resolve(name.decode("ascii", "replace"), "TXT", lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(type(exc).__name__) from None
        for record in answer:
            return b"".join(record.strings)
        return None

    def cached(self, name: bytes, timeout: float | None = None) -> bytes | None:
        """What :meth:`__call__` would answer, from the cache alone; :class:`NotCached` otherwise."""
        try:
            qname = dns.name.from_text(name.decode("ascii", "replace"))
        except dns.exception.DNSException:
            raise NotCached(name) from None
        cache = self._resolver.cache
        answer = cache.get((qname, dns.rdatatype.TXT, dns.rdataclass.IN))
        if answer is not None:
            for record in answer.rrset or ():
                return b"".join(record.strings)
            return None
        negative = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        if negative is not None and negative.response.rcode() == dns.rcode.NXDOMAIN:
            return None
        raise NotCached(name)

