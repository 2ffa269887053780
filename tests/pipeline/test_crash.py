"""SIGKILL during a burst of concurrent sends: a 250 is a promise that survives the crash."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from tests.support.gateway import free_port, write_config
from tests.support.process import start_daemon
from tests.support.smtp import Client, Sink, message

pytestmark = pytest.mark.slow

CLIENTS = 20
ROUNDS = 3


async def sender(port: int, worker: int, accepted: dict[str, str], stop: asyncio.Event) -> None:
    """Sends messages until the daemon dies; records the Message-ID of every one that got a 250."""
    sequence = 0
    while not stop.is_set():
        try:
            client = await Client.connect(port)
            await client.greet()
            while not stop.is_set():
                sequence += 1
                message_id = f"<w{worker}.s{sequence}.{random.random()}@customer.test>"
                await client.cmd(f"MAIL FROM:<w{worker}@customer.test>")
                await client.cmd("RCPT TO:<support@example.test>")
                [reply] = await client.data(message(f"Burst {worker}/{sequence}", message_id=message_id,
                                                    sender=f"w{worker}@customer.test"))
                if reply.code == 250:
                    accepted[message_id] = reply.text.rsplit(" ", 1)[1]
        except (ConnectionError, OSError, asyncio.TimeoutError, AssertionError, ValueError):
            await asyncio.sleep(0.01)


def forwarded_ids(sink: Sink) -> Counter[str]:
    found: Counter[str] = Counter()
    for item in sink.received:
        match = re.search(rb"\r\nX-Original-Message-ID: (<[^>]+>)\r\n", item.content)
        if match:
            found[match.group(1).decode()] += 1
    return found


async def test_every_message_that_got_250_survives_sigkill_and_is_forwarded(tmp_path: Path) -> None:
    sink = Sink(free_port())
    await sink.start()
    smtp_port = free_port()
    config_path, config = write_config(tmp_path, smtp_port=smtp_port, lmtp_port=free_port(),
                                       relay_port=sink.port)
    log = tmp_path / "gatewayd.log"
    accepted: dict[str, str] = {}
    try:
        for _ in range(ROUNDS):
            process = await start_daemon(config_path, smtp_port, log)
            stop = asyncio.Event()
            workers = [asyncio.create_task(sender(smtp_port, w, accepted, stop)) for w in range(CLIENTS)]
            await asyncio.sleep(random.uniform(0.4, 1.5))
            process.send_signal(signal.SIGKILL)
            await process.wait()
            stop.set()
            await asyncio.gather(*workers)

        assert len(accepted) > CLIENTS, "the burst should have had many messages accepted"
        with sqlite3.connect(config.store.path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {row[0]: row[1] for row in db.execute("SELECT message_id, ticket FROM messages")}
        missing = [m for m in accepted if m not in stored]
        assert not missing, f"{len(missing)} messages got 250 but are not in the store"
        for message_id, ticket in accepted.items():
            assert f"{config.tickets.prefix}-{stored[message_id]}" == ticket

        process = await start_daemon(config_path, smtp_port, log)
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while set(accepted) - set(forwarded_ids(sink)):
                assert asyncio.get_running_loop().time() < deadline, \
                    f"{len(set(accepted) - set(forwarded_ids(sink)))} accepted messages never forwarded"
                await asyncio.sleep(0.2)
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
        duplicates = sum(n - 1 for n in forwarded_ids(sink).values() if n > 1)
        print(f"\ncrash test: {len(accepted)} accepted over {ROUNDS} SIGKILLs, all stored and forwarded; "
              f"{duplicates} duplicate forwards (at-least-once delivery after a kill)")
    finally:
        await sink.stop()
