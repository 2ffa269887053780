"""A loopback resolver for every test gateway that does not bring its own DNS stub.

gatewayd looks up ``_dmarc`` records for inbound mail; without a ``dns:``
section it would ask the machine's resolver, and tests must not send a packet
beyond loopback. This one answers NXDOMAIN to every query (no SOA, so nothing
is cached and a test sees each lookup), from a thread that lives as long as
the test process, so daemons started as subprocesses can use it too.
"""

from __future__ import annotations

import functools
import socket
import threading

import dns.message
import dns.rcode


def _serve(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            response = dns.message.make_response(dns.message.from_wire(data))
        except Exception:  # noqa: BLE001 - a garbled datagram is dropped, as a resolver would
            continue
        response.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(response.to_wire(), peer)


@functools.cache
def loopback_resolver() -> int:
    """The UDP port of the process-wide NXDOMAIN resolver on 127.0.0.1, started on first use."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    threading.Thread(target=_serve, args=(sock,), name="test-resolver", daemon=True).start()
    return int(sock.getsockname()[1])
