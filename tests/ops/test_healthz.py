"""``/healthz``: 200 only while the listeners are up and the store takes a write; quick either way.

Tests run as root, for whom file modes do not make a store read-only, so the
unwritable store is another process holding SQLite's write lock: the same
thing the daemon sees when the disk stalls or an admin's tool locks the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from gatewayd.daemon import HEALTH_TIMEOUT
from tests.conftest import Gateway
from tests.ops.helpers import http_get, scrape
from tests.support.gateway import free_port


async def test_healthy_daemon_answers_200(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    await gateway_factory(metrics_port=port)
    assert await http_get(port, "/healthz") == (200, b"ok\n")


async def test_store_that_cannot_take_a_write_answers_503_within_the_health_timeout(
        gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    gw: Gateway = await gateway_factory(metrics_port=port)
    blocker = sqlite3.connect(gw.config.store.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        status, body = await http_get(port, "/healthz")
        elapsed = time.monotonic() - started
        assert (status, body) == (503, b"store not writable\n")
        assert HEALTH_TIMEOUT - 0.2 < elapsed < HEALTH_TIMEOUT + 2
        assert (await scrape(port)).value("gatewayd_outbox_oldest_age_seconds") == 0, \
            "metrics are still served from the reader while the writer is blocked"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert await http_get(port, "/healthz") == (200, b"ok\n")


async def test_listener_down_answers_503(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    gw: Gateway = await gateway_factory(metrics_port=port)
    smtp = next(s for s in gw.daemon._running.servers
                if any(sock.getsockname()[1] == gw.smtp_port for sock in s.sockets))
    smtp.close()
    await asyncio.sleep(0)
    assert await http_get(port, "/healthz") == (503, b"listeners down\n")


async def test_unknown_path_is_404_and_post_is_405(gateway_factory: Callable[..., Any]) -> None:
    port = free_port()
    await gateway_factory(metrics_port=port)
    assert (await http_get(port, "/nope"))[0] == 404
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /metrics HTTP/1.0\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.0 405 ")
    writer.close()
