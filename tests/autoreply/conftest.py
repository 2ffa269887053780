"""Fixtures for receipts and DKIM: a gateway with receipts on, a loopback DNS stub, test keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from gatewayd.dkim import GeneratedKey, generate_key
from gatewayd.store import EventRecord, Store
from tests.support.gateway import REPO, free_port
from tests.support.smtp import Received, Sink

TEMPLATES = REPO / "etc" / "templates"
OUTCOMES = ("receipt_queued", "autoreply_suppressed", "receipt_failed")


def autoreply_yaml(*, rate: str = "{per_sender: 3, per_domain: 10, window: 10m, daily: 1000}",
                   followups: str = "none", unauthenticated: str = "accept", dns_port: int | None = None,
                   dns_timeout: str = "1s", dkim: str = "", templates: Path = TEMPLATES, more: str = "") -> str:
    text = (f"autoreply:\n  followups: {followups}\n  rate: {rate}\n  templates: \"{templates}\"\n"
            f"authentication: {{unauthenticated: {unauthenticated}}}\n")
    if dns_port is not None:
        text += f'dns: {{resolver: "127.0.0.1:{dns_port}", timeout: {dns_timeout}}}\n'
    return text + dkim + more


def receipts(sink: Sink, rcpt: str = "carol@customer.test") -> list[Received]:
    return [r for r in sink.received if r.mail_from in ("", "<>") and r.rcpt_tos == [rcpt]]


def forwards(sink: Sink) -> list[Received]:
    return [r for r in sink.received if r.mail_from not in ("", "<>")]


async def outcome(store: Store, ticket: int, timeout: float = 10) -> EventRecord:
    """The receipt decision recorded for ``ticket`` (waits for the worker)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [e for e in await store.events(ticket) if e.kind in OUTCOMES]
        if found:
            return found[-1]
        assert asyncio.get_running_loop().time() < deadline, f"no receipt decision for ticket {ticket}"
        await asyncio.sleep(0.02)


async def settle(sink: Sink, count: int, timeout: float = 10) -> list[Received]:
    """Waits for ``count`` relayed messages, then a moment more so any extra one would show up."""
    received = await sink.wait_for(count, timeout)
    await asyncio.sleep(0.3)
    return received


@dataclass
class DnsStub(asyncio.DatagramProtocol):
    """A loopback DNS server answering TXT queries from ``records``; anything else is NXDOMAIN."""

    records: dict[str, str] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)
    transport: Any = None
    negative_ttl: int = 0
    """The SOA minimum sent with NXDOMAIN, as a real zone does; 0 lets nobody cache it."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().lower()
        self.queries.append(name)
        value = self.records.get(name)
        if value is not None and question.rdtype == dns.rdatatype.TXT:
            chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
            response.answer.append(dns.rrset.from_text(question.name, 60, dns.rdataclass.IN, dns.rdatatype.TXT,
                                                       chunks))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(dns.rrset.from_text(
                question.name.parent(), self.negative_ttl, dns.rdataclass.IN, dns.rdatatype.SOA,
                f"ns.test. hostmaster.test. 1 3600 600 86400 {self.negative_ttl}"))
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def dns_stub() -> AsyncIterator[tuple[DnsStub, int]]:
    port = free_port()
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        DnsStub, local_addr=("127.0.0.1", port))
    yield protocol, port
    transport.close()


@pytest.fixture(scope="session")
def rsa_key() -> GeneratedKey:
    return generate_key("rsa-sha256", 2048)


@pytest.fixture(scope="session")
def ed25519_key() -> GeneratedKey:
    return generate_key("ed25519-sha256")


@pytest.fixture
def stub_dnsfunc() -> Callable[[dict[str, str]], Callable[..., bytes | None]]:
    """``stub_dnsfunc({"sel._domainkey.example.org.": "v=DKIM1; ..."})``: a dkimpy dnsfunc, no network."""
    def make(records: dict[str, str]) -> Callable[..., bytes | None]:
        def lookup(name: bytes, timeout: float = 5) -> bytes | None:
            value = records.get(name.decode().lower())
            return value.encode() if value is not None else None
        return lookup
    return make
