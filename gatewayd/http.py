"""The metrics endpoint: ``/metrics`` for Prometheus and ``/healthz`` for liveness checks.

A deliberately tiny HTTP/1.0 responder on the daemon's own loop: two GET
routes do not justify a web framework, and prometheus-client's own server
would run in a thread, outside the loop that owns the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("gatewayd.http")

Route = Callable[[], Awaitable[tuple[int, str, bytes]]]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable",
            500: "Internal Server Error"}


async def serve(host: str, port: int, routes: dict[str, Route]) -> asyncio.base_events.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=10)
            while (await asyncio.wait_for(reader.readline(), timeout=10)) not in (b"\r\n", b"\n", b""):
                pass
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path not in routes:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                try:
                    status, ctype, body = await routes[path]()
                except Exception:
                    log.exception("HTTP handler for %s failed", path)
                    status, ctype, body = 500, "text/plain", b"internal error\n"
            head = (f"HTTP/1.0 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
            writer.write(head + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
