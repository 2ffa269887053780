"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd considers gatewayd started only when it says
``READY=1`` (store open, every listener bound), so units ordered after it and
``systemctl start`` itself wait for a gateway that really accepts mail. The
protocol is a single datagram on a unix socket; a dependency would be heavier
than the code.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("gatewayd.sdnotify")

READY = "READY=1"
STOPPING = "STOPPING=1"
RELOADING = "RELOADING=1"


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Sends ``fields`` (e.g. ``READY=1``, ``STATUS=...``) to the service manager.

    Returns False when not started by systemd (no ``$NOTIFY_SOCKET``) or when the
    socket cannot be reached; a notification is never worth failing the daemon for.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an abstract socket", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode("utf-8"))
    except OSError as exc:
        log.warning("sd_notify to %r failed: %s", address, exc)
        return False
    return True
