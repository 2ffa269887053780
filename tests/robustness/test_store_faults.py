"""The store runs out of space, fails an I/O, or is corrupt at start: never a false 250, never a lost one."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gatewayd.store import Store
from tests.support.gateway import free_port, write_config
from tests.support.process import run_gatewayd
from tests.support.smtp import message, send_message

pytestmark = pytest.mark.slow


async def writer_pragma(store: Store, pragma: str) -> Any:
    """Runs a PRAGMA on the store's own writer connection: ``max_page_count`` is per connection."""
    async def run(tx: Any) -> Any:
        row = await tx.fetchone(f"PRAGMA {pragma}")
        return row[0] if row else None
    return await store.transact(run)


async def cap_to_current_size(store: Store) -> None:
    pages = await writer_pragma(store, "page_count")
    assert await writer_pragma(store, f"max_page_count = {pages}") == pages


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


class FailingCommits:
    """Makes the writer's COMMIT fail with SQLite's own I/O error while armed."""

    def __init__(self, store: Store) -> None:
        self.armed = True
        self.failed = 0
        self._writer = store._writer  # the only way to reach the commit SQLite runs
        self._control = self._writer.control

    def install(self) -> None:
        self._writer.control = self._fail_commit  # type: ignore[method-assign]

    def remove(self) -> None:
        self._writer.control = self._control  # type: ignore[method-assign]

    def _fail_commit(self, conn: sqlite3.Connection, sql: str) -> None:
        if self.armed and sql == "COMMIT":
            self.failed += 1
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE  # type: ignore[attr-defined]
            raise error
        self._control(conn, sql)


class TestStoreFull:
    async def test_a_full_store_answers_452_and_work_resumes_when_space_returns(self, gateway):
        [before] = await send_message(gateway.smtp_port, message("before", message_id="<before@c.test>"))
        assert before.code == 250
        await gateway.sink.wait_for(1)
        await cap_to_current_size(gateway.store)

        big = message("while full", message_id="<full@c.test>", body=("y" * 76 + "\r\n") * 2000)
        replies = [await send_message(gateway.smtp_port, big) for _ in range(3)]
        assert [r.code for [r] in replies] == [452, 452, 452]
        assert all(r.text.startswith("4.3.1") for [r] in replies)
        row = await gateway.store.fetchone("SELECT count(*) FROM messages")
        assert row[0] == 1, "nothing is stored while the store is full"

        await writer_pragma(gateway.store, "max_page_count = 1073741823")
        [after] = await send_message(gateway.smtp_port, big)
        assert after.code == 250
        forwards = await gateway.sink.wait_for(2)
        assert forwards[1].content.endswith(("y" * 76 + "\r\n").encode() * 2000)

    async def test_mail_accepted_just_before_the_store_fills_is_still_forwarded(self, gateway, sink):
        await sink.stop()
        accepted = []
        for n in range(5):
            [reply] = await send_message(gateway.smtp_port, message(f"early {n}", message_id=f"<e{n}@c.test>"))
            accepted.append(reply.code)
        assert accepted == [250] * 5
        await cap_to_current_size(gateway.store)
        await sink.start()
        await asyncio.sleep(1.0)
        await writer_pragma(gateway.store, "max_page_count = 1073741823")
        forwards = await sink.wait_for(5, timeout=20)
        subjects = sorted(f.content.split(b"X-Original-Subject: ")[1].split(b"\r\n")[0] for f in forwards)
        assert subjects == [f"early {n}".encode() for n in range(5)]


class TestStoreIOError:
    async def test_a_failing_commit_answers_451_without_detail_and_stores_nothing(self, gateway):
        fault = FailingCommits(gateway.store)
        fault.install()
        try:
            [reply] = await send_message(gateway.smtp_port, message(message_id="<io@c.test>"))
        finally:
            fault.remove()
        assert fault.failed >= 1
        assert reply.code == 451 and reply.text.startswith("4.3.0")
        assert "I/O" not in reply.text and "sqlite" not in reply.text.lower()
        row = await gateway.store.fetchone("SELECT count(*) FROM messages")
        assert row[0] == 0

        [retry] = await send_message(gateway.smtp_port, message(message_id="<io@c.test>"))
        assert retry.code == 250
        assert len(await gateway.sink.wait_for(1)) == 1


def corrupt_pages(path: Path) -> None:
    """Flips bytes in the last (data) page: the schema reads fine, the integrity check does not."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 4096, len(data), 97):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def not_a_database(path: Path) -> None:
    path.write_bytes(b"this was a gatewayd store until a disk ate it\n" * 200)


class TestCorruptStoreAtStart:
    @pytest.mark.parametrize("damage", [corrupt_pages, not_a_database], ids=["corrupt-pages", "not-a-database"])
    async def test_refuses_to_start_names_the_file_and_leaves_it_alone(self, tmp_path: Path, damage) -> None:
        config_path, config = write_config(tmp_path, smtp_port=free_port(), lmtp_port=free_port(),
                                           relay_port=free_port())
        store = await Store.open(config.store.path)
        for n in range(50):
            await store.transact(lambda tx, n=n: tx.execute(
                "INSERT INTO events (ticket, at, kind, detail) VALUES (NULL, ?, 'filler', ?)", (n, "x" * 500)))
        await store.close()
        damage(config.store.path)
        before = config.store.path.read_bytes()

        code, stderr = await run_gatewayd("run", "-c", str(config_path))

        assert code != 0
        assert str(config.store.path) in stderr
        assert "Traceback" not in stderr
        assert config.store.path.read_bytes() == before, "a corrupt store is never rewritten or recreated"
