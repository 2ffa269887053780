"""A loopback DNS server that answers NXDOMAIN (with an SOA) to everything, for the benchmark.

Intake looks up ``_dmarc`` records for every message; a resolver that never
answers would make each message wait for the DNS timeout, which measures the
timeout, not gatewayd. A real site's caching resolver answers such lookups in
well under a millisecond, as this stub does.

Usage: python bench/dns_stub.py PORT
"""

from __future__ import annotations

import socket
import sys

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

NEGATIVE_TTL = 300


def serve(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))
        while True:
            data, peer = sock.recvfrom(4096)
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - a garbled datagram is ignored, as a resolver would
                continue
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.NXDOMAIN)
            # With the zone's SOA, as real servers answer: resolvers cache the NXDOMAIN for its minimum.
            response.authority.append(dns.rrset.from_text(
                query.question[0].name.parent(), NEGATIVE_TTL, dns.rdataclass.IN, dns.rdatatype.SOA,
                f"ns.bench. hostmaster.bench. 1 3600 600 86400 {NEGATIVE_TTL}"))
            sock.sendto(response.to_wire(), peer)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
