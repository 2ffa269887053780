"""The SQLite store: durable, upgradeable, batched, and honest about failure.

All tests use real SQLite files under ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gatewayd.errors import StoreCorrupt, StoreFull, StoreUnavailable
from gatewayd.store import Store, Tx, Writes
from gatewayd.store import checkpoints
from gatewayd.store.api import RecentRaw
from gatewayd.store.checkpoints import Checkpointer
from gatewayd.store.schema import LATEST, MIGRATIONS


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def build_v1_store(path: Path) -> None:
    """A store exactly as the first released schema left it, with one ticket in it."""
    with sqlite3.connect(path) as db:
        for statement in _statements(MIGRATIONS[0]):
            db.execute(statement)
        db.execute("INSERT INTO tickets (number, subject, customer, created_at, updated_at) "
                   "VALUES (1000, 'printer on fire', 'carol@example.org', 1.0, 2.0)")
        db.execute("PRAGMA user_version = 1")
    db.close()


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    db.close()
    return version


def table_names(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    return names


async def insert_probe(tx: Tx, label: str) -> int:
    return await tx.execute(
        "INSERT INTO events (ticket, at, kind, actor, detail) VALUES (NULL, ?, 'probe', ?, '{}')",
        (time.time(), label))


async def probe_labels(store: Store) -> list[str]:
    rows = await store.fetchall("SELECT actor FROM events WHERE kind = 'probe' ORDER BY id")
    return [row[0] for row in rows]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "gatewayd.sqlite3")
    yield opened
    await opened.close()


# --------------------------------------------------------------------------- opening and migrating


class TestOpening:
    async def test_a_new_store_is_created_at_the_latest_schema(self, tmp_path: Path) -> None:
        path = tmp_path / "var" / "new" / "gatewayd.sqlite3"
        store = await Store.open(path)
        await store.close()
        assert user_version(path) == LATEST
        assert {"tickets", "messages", "events", "work", "outbox", "agent_state", "plugin_state"} <= table_names(path)

    async def test_an_older_store_is_upgraded_and_keeps_its_data(self, tmp_path: Path) -> None:
        path = tmp_path / "old.sqlite3"
        build_v1_store(path)
        assert "agent_state" not in table_names(path)

        store = await Store.open(path)
        try:
            ticket = await store.ticket(1000)
            await store.set_agent_away("alice", True, "holiday")
            states = await store.agent_states()
        finally:
            await store.close()

        assert user_version(path) == LATEST
        assert ticket is not None and ticket.subject == "printer on fire"
        assert ticket.customer == "carol@example.org"
        assert {"agent_state", "plugin_state"} <= table_names(path)
        assert states["alice"].away is True

    async def test_reopening_a_current_store_changes_nothing(self, tmp_path: Path) -> None:
        path = tmp_path / "gatewayd.sqlite3"
        store = await Store.open(path)
        await store.transact(lambda tx: insert_probe(tx, "kept"))
        await store.close()
        store = await Store.open(path, check=True)
        try:
            assert await probe_labels(store) == ["kept"]
        finally:
            await store.close()
        assert user_version(path) == LATEST

    async def test_a_corrupt_file_is_refused_by_name_and_left_untouched(self, tmp_path: Path) -> None:
        path = tmp_path / "gatewayd.sqlite3"
        garbage = os.urandom(8192)
        path.write_bytes(garbage)
        with pytest.raises(StoreCorrupt) as caught:
            await Store.open(path)
        assert str(path) in str(caught.value)
        assert path.read_bytes() == garbage
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gatewayd.sqlite3"]

    async def test_damaged_pages_are_found_by_the_start_up_check(self, tmp_path: Path) -> None:
        path = tmp_path / "gatewayd.sqlite3"
        store = await Store.open(path)
        for n in range(20):
            await store.transact(lambda tx, n=n: tx.execute(
                "INSERT INTO tickets (number, subject, customer, created_at, updated_at) VALUES (?, ?, ?, 1, 1)",
                (1000 + n, "x" * 3000, "c@example.org")))
        await store.close()
        data = bytearray(path.read_bytes())
        page = 4096
        assert len(data) > 6 * page
        data[3 * page:5 * page] = os.urandom(2 * page)
        path.write_bytes(bytes(data))
        with pytest.raises(StoreCorrupt) as caught:
            await Store.open(path, check=True)
        assert str(path) in str(caught.value)
        assert path.read_bytes() == bytes(data)

    async def test_an_sqlite_file_of_another_application_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "other.sqlite3"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE recipes (name TEXT)")
            db.execute("INSERT INTO recipes VALUES ('bread')")
        db.close()
        before = path.read_bytes()
        with pytest.raises(StoreCorrupt, match="not a gatewayd store") as caught:
            await Store.open(path)
        assert str(path) in str(caught.value)
        assert path.read_bytes() == before
        assert table_names(path) == {"recipes"}

    async def test_another_applications_file_is_refused_even_with_a_user_version(self, tmp_path: Path) -> None:
        """``user_version`` is not ours alone; a foreign file must not be "upgraded" into a store."""
        path = tmp_path / "other.sqlite3"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE recipes (name TEXT)")
            db.execute("PRAGMA user_version = 1")
        db.close()
        with pytest.raises(StoreCorrupt, match="not a gatewayd store"):
            await Store.open(path)
        assert table_names(path) == {"recipes"}

    async def test_a_store_from_a_newer_gatewayd_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "gatewayd.sqlite3"
        store = await Store.open(path)
        await store.close()
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version = {LATEST + 1}")
        db.close()
        with pytest.raises(StoreCorrupt, match="newer") as caught:
            await Store.open(path)
        assert str(path) in str(caught.value)
        assert user_version(path) == LATEST + 1

    async def test_runs_in_wal_mode_with_full_sync(self, store: Store, tmp_path: Path) -> None:
        """``synchronous`` is per connection, so it is read through the writer itself."""
        journal = await store.transact(lambda tx: tx.fetchone("PRAGMA journal_mode"))
        synchronous = await store.transact(lambda tx: tx.fetchone("PRAGMA synchronous"))
        assert journal[0] == "wal"
        assert synchronous[0] == 2  # FULL
        with sqlite3.connect(tmp_path / "gatewayd.sqlite3") as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.close()

    async def test_a_closed_store_refuses_writes(self, tmp_path: Path) -> None:
        store = await Store.open(tmp_path / "gatewayd.sqlite3")
        await store.close()
        with pytest.raises(StoreUnavailable):
            await store.transact(lambda tx: insert_probe(tx, "late"))


# --------------------------------------------------------------------------- group commit


class TestGroupCommit:
    async def test_concurrent_jobs_share_commits_and_all_land(self, store: Store) -> None:
        results = await asyncio.gather(*(store.transact(lambda tx, n=n: insert_probe(tx, f"job-{n}"))
                                         for n in range(50)))
        assert len(set(results)) == 50
        assert store.stats.jobs == 50
        assert store.stats.commits < store.stats.jobs
        assert sorted(await probe_labels(store)) == sorted(f"job-{n}" for n in range(50))

    async def test_a_job_is_committed_without_waiting_for_a_turn_of_the_event_loop(self, store: Store) -> None:
        """The writer thread begins, runs and commits a batch on its own: a busy loop delays only the reply."""
        caller = asyncio.create_task(store.transact(lambda tx: insert_probe(tx, "while busy")))
        await asyncio.sleep(0)  # the job is handed over
        deadline = time.monotonic() + 5
        committed = False
        while not committed and time.monotonic() < deadline:  # the loop stays blocked all along
            with sqlite3.connect(store.path) as other:
                committed = other.execute("SELECT count(*) FROM events WHERE actor = 'while busy'").fetchone()[0] == 1
            other.close()
            time.sleep(0.01)
        assert committed
        assert not caller.done()
        assert await caller > 0

    async def test_a_failing_job_rolls_back_alone(self, store: Store) -> None:
        async def half_then_fail(tx: Tx) -> None:
            await insert_probe(tx, "doomed")
            raise LookupError("the job changed its mind")

        outcomes = await asyncio.gather(
            store.transact(lambda tx: insert_probe(tx, "before")),
            store.transact(half_then_fail),
            store.transact(lambda tx: insert_probe(tx, "after")),
            return_exceptions=True)

        assert store.stats.commits == 1, "the three jobs were meant to share one batch"
        assert isinstance(outcomes[1], LookupError)
        assert await probe_labels(store) == ["before", "after"]

    async def test_an_sql_error_in_a_job_rolls_back_alone(self, store: Store) -> None:
        async def bad_sql(tx: Tx) -> None:
            await insert_probe(tx, "doomed")
            await tx.execute("INSERT INTO no_such_table VALUES (1)")

        outcomes = await asyncio.gather(
            store.transact(lambda tx: insert_probe(tx, "ok")), store.transact(bad_sql), return_exceptions=True)
        assert isinstance(outcomes[1], StoreUnavailable)
        assert await probe_labels(store) == ["ok"]

    async def test_a_cancelled_caller_still_gets_its_whole_job_committed(self, store: Store) -> None:
        """A client hanging up mid-DATA cancels the caller, never half of the job."""
        started = threading.Event()

        async def slow_job(tx: Tx) -> None:
            started.set()
            for n in range(5):
                await insert_probe(tx, f"part-{n}")
                time.sleep(0.01)  # jobs run in SQLite's thread: blocking there stalls no session

        caller = asyncio.create_task(store.transact(slow_job))
        assert await asyncio.to_thread(started.wait, 5)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await store.transact(lambda tx: insert_probe(tx, "next"))
        assert await probe_labels(store) == [f"part-{n}" for n in range(5)] + ["next"]

    async def test_a_job_that_awaits_anything_but_its_transaction_fails_alone(self, store: Store) -> None:
        """Jobs run whole in SQLite's thread, where only the transaction's own calls can be awaited."""
        async def sleeps(tx: Tx) -> None:
            await insert_probe(tx, "undone")
            await asyncio.sleep(0)

        outcomes = await asyncio.gather(store.transact(lambda tx: insert_probe(tx, "ok")), store.transact(sleeps),
                                        return_exceptions=True)
        assert isinstance(outcomes[1], RuntimeError) and "awaited something other" in str(outcomes[1])
        assert await probe_labels(store) == ["ok"]

    async def test_a_job_that_raises_cancelled_error_fails_alone_and_the_writer_lives_on(self, store: Store) -> None:
        """CancelledError is not an Exception: it must still fail only its job, never the writer thread."""
        gone = asyncio.get_running_loop().create_future()
        gone.cancel()

        async def awaits_a_cancelled_future(tx: Tx) -> None:
            await insert_probe(tx, "undone")
            await gone

        outcomes = await asyncio.gather(store.transact(lambda tx: insert_probe(tx, "ok")),
                                        store.transact(awaits_a_cancelled_future), return_exceptions=True)
        assert isinstance(outcomes[0], int)
        assert isinstance(outcomes[1], RuntimeError) and "CancelledError" in str(outcomes[1])
        await store.transact(lambda tx: insert_probe(tx, "after"))
        assert await probe_labels(store) == ["ok", "after"]

    async def test_a_job_that_breaks_its_savepoint_does_not_wedge_the_store(self, store: Store) -> None:
        """A savepoint that cannot be rolled back fails its batch, and the transaction is ended with it."""
        async def breaks_savepoint(tx: Tx) -> None:
            await tx.execute("RELEASE job")
            raise RuntimeError("after its savepoint was gone")

        with pytest.raises(StoreUnavailable):
            await store.transact(breaks_savepoint)
        await store.transact(lambda tx: insert_probe(tx, "after"))
        assert await probe_labels(store) == ["after"]
        assert await store.writable()

    async def test_concurrent_jobs_see_each_others_writes_in_order(self, store: Store) -> None:
        """Jobs of one batch run one after another on the writer, so each sees the ones before."""
        async def count_then_insert(tx: Tx) -> int:
            row = await tx.fetchone("SELECT count(*) FROM events WHERE kind = 'probe'")
            await insert_probe(tx, "x")
            return row[0]

        seen = await asyncio.gather(*(store.transact(count_then_insert) for _ in range(20)))
        assert sorted(seen) == list(range(20))

    async def test_a_caller_timing_out_while_queued_still_gets_its_job_committed(self, store: Store) -> None:
        async def slow_job(tx: Tx) -> None:
            time.sleep(0.05)
            await insert_probe(tx, "first")

        async def queued_job(tx: Tx) -> None:
            for n in range(3):
                await insert_probe(tx, f"queued-{n}")

        first = asyncio.create_task(store.transact(slow_job))
        await asyncio.sleep(0)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.transact(queued_job), timeout=0.001)
        await first
        await store.transact(lambda tx: insert_probe(tx, "last"))
        assert await probe_labels(store) == ["first", "queued-0", "queued-1", "queued-2", "last"]

    async def test_close_finishes_queued_jobs(self, tmp_path: Path) -> None:
        path = tmp_path / "gatewayd.sqlite3"
        store = await Store.open(path)
        pending = [asyncio.create_task(store.transact(lambda tx, n=n: insert_probe(tx, f"job-{n}")))
                   for n in range(10)]
        await asyncio.sleep(0)
        await store.close()
        await asyncio.gather(*pending)
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM events WHERE kind = 'probe'").fetchone()[0] == 10
        db.close()


class TestTransactEach:
    async def test_many_parts_commit_once_each_rolling_back_alone(self, store: Store) -> None:
        async def doomed(tx: Tx) -> None:
            await insert_probe(tx, "doomed")
            raise LookupError("this part changed its mind")

        async def bad_sql(tx: Tx) -> None:
            await insert_probe(tx, "doomed too")
            await tx.execute("INSERT INTO no_such_table VALUES (1)")

        commits = store.stats.commits
        outcomes = await store.transact_each([lambda tx: insert_probe(tx, "a"), doomed,
                                              lambda tx: insert_probe(tx, "b"), bad_sql,
                                              lambda tx: insert_probe(tx, "c")])
        assert store.stats.commits == commits + 1
        assert isinstance(outcomes[1], LookupError) and isinstance(outcomes[3], StoreUnavailable)
        assert all(isinstance(outcomes[n], int) for n in (0, 2, 4))
        assert await probe_labels(store) == ["a", "b", "c"]

    async def test_later_parts_see_earlier_ones(self, store: Store) -> None:
        async def count_then_insert(tx: Tx) -> int:
            row = await tx.fetchone("SELECT count(*) FROM events WHERE kind = 'probe'")
            await insert_probe(tx, "x")
            return row[0]

        assert await store.transact_each([count_then_insert] * 5) == [0, 1, 2, 3, 4]

    async def test_a_part_that_aborts_the_transaction_reports_nothing_committed_that_is_not(
            self, store: Store) -> None:
        """SQLITE_FULL may abort the whole transaction: every part is then either refused or really stored."""
        await store.transact(lambda tx: insert_probe(tx, "warm-up"))
        (pages,) = await store.transact(lambda tx: tx.fetchone("PRAGMA page_count"))
        await store.transact(lambda tx: tx.fetchone(f"PRAGMA max_page_count = {pages}"))

        async def big_row(tx: Tx) -> None:
            await tx.execute("INSERT INTO events (ticket, at, kind, actor, detail) VALUES (NULL, 0, 'big', NULL, ?)",
                             ("x" * 200_000,))

        outcomes = await store.transact_each([lambda tx: insert_probe(tx, "before"), big_row])
        assert isinstance(outcomes[1], StoreFull)
        assert ("before" in await probe_labels(store)) == isinstance(outcomes[0], int)

    async def test_writes_parts_go_together_and_still_roll_back_alone(self, store: Store) -> None:
        """Statement-only parts share one commit, each in its own savepoint."""
        probe = "INSERT INTO events (ticket, at, kind, actor, detail) VALUES (NULL, 0, 'probe', ?, '{}')"
        parts = [Writes(((probe, ("a",)),)),
                 Writes(((probe, ("doomed",)), ("INSERT INTO no_such_table VALUES (1)", ()))),
                 lambda tx: insert_probe(tx, "b"),
                 Writes(((probe, ("c",)), (probe, ("d",))))]
        commits = store.stats.commits
        outcomes = await store.transact_each(parts)
        assert store.stats.commits == commits + 1
        assert outcomes[0] is None and isinstance(outcomes[1], StoreUnavailable) and outcomes[3] is None
        assert await probe_labels(store) == ["a", "b", "c", "d"]

    async def test_a_waiting_caller_is_committed_without_waiting_for_background_parts(self, store: Store) -> None:
        """Intake's commit must not queue behind a router batch: background parts yield to it."""
        async def slow_part(tx: Tx, n: int) -> int:
            time.sleep(0.01)
            return await insert_probe(tx, f"part-{n}")

        background = asyncio.create_task(store.transact_each([lambda tx, n=n: slow_part(tx, n) for n in range(50)]))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await store.transact(lambda tx: insert_probe(tx, "caller"))
        waited = time.monotonic() - started
        labels = await probe_labels(store)
        assert waited < 0.2, f"waited {waited:.3f}s for 50 parts of 10 ms"
        assert "caller" in labels and "part-49" not in labels
        assert all(isinstance(o, int) for o in await background)
        assert len(await probe_labels(store)) == 51


# --------------------------------------------------------------------------- store full


class TestStoreFull:
    async def test_a_full_store_raises_store_full_and_recovers_when_space_returns(self, store: Store) -> None:
        (pages,) = await store.transact(lambda tx: tx.fetchone("PRAGMA page_count"))
        await store.transact(lambda tx: tx.fetchone(f"PRAGMA max_page_count = {pages}"))

        async def big_row(tx: Tx) -> int:
            return await tx.execute(
                "INSERT INTO events (ticket, at, kind, actor, detail) VALUES (NULL, 0, 'big', NULL, ?)",
                ("x" * 200_000,))

        with pytest.raises(StoreFull):
            await store.transact(big_row)
        with pytest.raises(StoreFull):
            await store.transact(big_row)

        await store.transact(lambda tx: tx.fetchone("PRAGMA max_page_count = 1000000"))
        assert await store.transact(big_row) > 0
        assert await store.writable()

    async def test_store_full_never_reports_a_job_committed_that_is_not(self, store: Store) -> None:
        """SQLite may abort the whole batch on SQLITE_FULL: every job is then either refused or really stored."""
        await store.transact(lambda tx: insert_probe(tx, "warm-up"))
        (pages,) = await store.transact(lambda tx: tx.fetchone("PRAGMA page_count"))
        await store.transact(lambda tx: tx.fetchone(f"PRAGMA max_page_count = {pages}"))

        async def big_row(tx: Tx) -> None:
            await insert_probe(tx, "big")
            await tx.execute("INSERT INTO events (ticket, at, kind, actor, detail) VALUES (NULL, 0, 'big', NULL, ?)",
                             ("x" * 200_000,))

        outcomes = await asyncio.gather(
            store.transact(lambda tx: insert_probe(tx, "before")),
            store.transact(big_row),
            store.transact(lambda tx: insert_probe(tx, "after")),
            return_exceptions=True)

        assert isinstance(outcomes[1], StoreFull)
        assert isinstance(outcomes[2], int), "a job after the one that did not fit still commits"
        stored = await probe_labels(store)
        assert "big" not in stored
        for label, outcome in (("before", outcomes[0]), ("after", outcomes[2])):
            assert isinstance(outcome, (int, StoreFull))
            assert (label in stored) == isinstance(outcome, int), (label, outcome, stored)


class TestHealthProbe:
    async def test_writable_commits_a_write_to_the_main_database(self, store: Store) -> None:
        """A temp table would live outside the store file; the probe must prove the file itself takes writes."""
        before = time.time()
        assert await store.writable()
        with sqlite3.connect(store.path) as other:
            (probed_at,) = other.execute("SELECT probed_at FROM health WHERE id = 1").fetchone()
        assert probed_at >= before


class TestClose:
    async def test_an_open_cancelled_during_start_up_leaves_no_writer_behind(self, tmp_path: Path) -> None:
        path = tmp_path / "s.sqlite3"
        def writers() -> int:
            return sum(t.name == "store-writer" for t in threading.enumerate())

        before = writers()
        opening = asyncio.create_task(Store.open(path))
        await asyncio.sleep(0)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        deadline = time.monotonic() + 5
        while writers() > before:
            assert time.monotonic() < deadline, "the writer thread of a cancelled open is still running"
            await asyncio.sleep(0.01)
        async with await Store.open(path) as store:
            assert await store.writable()


    async def test_a_write_after_close_began_is_refused_not_left_hanging(self, tmp_path: Path) -> None:
        store = await Store.open(tmp_path / "s.sqlite3")
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.transact(lambda tx: tx.fetchone("SELECT 1")), 5)
        await closing


class TestRecentMessages:
    """The outbox sends what the router read moments before without reading it again."""

    @staticmethod
    async def add_forward(store: Store, raw: bytes) -> tuple[int, int]:
        async def write(tx: Tx) -> tuple[int, int]:
            message = await tx.execute(
                "INSERT INTO messages (direction, mail_from, rcpt_to, digest, size, raw, received_at) "
                "VALUES ('in', 'carol@customer.test', '[]', 'd', ?, ?, 1.0)", (len(raw), raw))
            item = await tx.execute(
                "INSERT INTO outbox (kind, message, mail_from, rcpt, message_id, head, next_attempt_at, "
                "created_at, updated_at) VALUES ('forward', ?, 'b@gw.test', 'alice@agents.test', '<f@gw.test>', "
                "?, 0, 0, 0)", (message, b"X-Head: 1\r\n"))
            return message, item
        return await store.transact(write)

    async def test_a_message_the_router_read_is_sent_without_reading_it_again(self, store: Store) -> None:
        message, item = await self.add_forward(store, b"Subject: one\r\n\r\nbody\r\n")
        assert (await store.inbound(message)).raw == b"Subject: one\r\n\r\nbody\r\n"  # type: ignore[union-attr]
        # Stored messages never change; this one does only to show which read answered.
        await store.transact(lambda tx: tx.execute("UPDATE messages SET raw = x'00' WHERE id = ?", (message,)))
        assert await store.outbox_parts(item, message) == (b"X-Head: 1\r\n", b"Subject: one\r\n\r\nbody\r\n")
        assert await store.outbox_parts(item) == (b"X-Head: 1\r\n", b"\x00")

    async def test_a_message_nobody_read_yet_comes_from_the_store(self, store: Store) -> None:
        message, item = await self.add_forward(store, b"Subject: two\r\n\r\nbody\r\n")
        assert await store.outbox_parts(item, message) == (b"X-Head: 1\r\n", b"Subject: two\r\n\r\nbody\r\n")
        with pytest.raises(KeyError):
            await store.outbox_parts(item + 1, message + 1)

    def test_the_least_recently_used_go_first_and_big_ones_are_not_kept(self) -> None:
        recent = RecentRaw(budget=400)
        recent.put(1, b"a" * 100)
        recent.put(2, b"b" * 100)
        recent.put(3, b"c" * 100)
        assert recent.get(1) == b"a" * 100  # now the most recent
        recent.put(4, b"d" * 100)
        recent.put(5, b"e" * 100)
        assert {n for n in range(1, 6) if recent.get(n) is not None} == {1, 3, 4, 5}
        recent.put(6, b"f" * 101)
        assert recent.get(6) is None, "over a quarter of the budget"


class TestInlineReads:
    """The worker process reads on its loop's thread; the reads behave as the reader thread's do."""

    async def test_reads_see_every_commit_and_never_write(self, tmp_path: Path) -> None:
        async with await Store.open(tmp_path / "s.sqlite3", inline_reads=True) as store:
            await store.transact(lambda tx: insert_probe(tx, "first"))
            assert await probe_labels(store) == ["first"]
            await store.transact(lambda tx: insert_probe(tx, "second"))
            assert await probe_labels(store) == ["first", "second"]
            with pytest.raises(StoreUnavailable, match="readonly"):
                await store.fetchall("DELETE FROM events")
            assert await probe_labels(store) == ["first", "second"]

    async def test_no_reader_thread_is_started(self, tmp_path: Path) -> None:
        before = threading.active_count()
        async with await Store.open(tmp_path / "inline.sqlite3", inline_reads=True) as store:
            assert await store.fetchone("SELECT 1") is not None
            inline = threading.active_count() - before
        async with await Store.open(tmp_path / "threaded.sqlite3") as store:
            assert await store.fetchone("SELECT 1") is not None
            threaded = threading.active_count() - before
        assert (inline, threaded) == (1, 2), "the writer alone; the writer and aiosqlite's reader"


class TestCheckpoints:
    """The WAL is copied into the store file by a thread of the daemon, never inside the commits that answer clients.

    Committed pages live in the ``-wal`` file until a checkpoint copies them,
    so the store file's size shows whether one has run.
    """

    MEGABYTE = "x" * (1 << 20)

    async def write_megabytes(self, store: Store, count: int) -> None:
        for _ in range(count):
            await store.transact(lambda tx: tx.execute(
                "INSERT INTO events (ticket, at, kind, detail) VALUES (NULL, 0, 'bulk', ?)", (self.MEGABYTE,)))

    async def grown_to(self, path: Path, size: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if path.stat().st_size >= size:
                return True
            await asyncio.sleep(0.02)
        return path.stat().st_size >= size

    async def test_a_command_line_store_checkpoints_in_its_commits_as_sqlite_does(self, tmp_path: Path) -> None:
        path = tmp_path / "cli.sqlite3"
        async with await Store.open(path) as store:
            await self.write_megabytes(store, 8)
            assert path.stat().st_size >= 8 << 20

    @pytest.mark.parametrize("mode", ["elsewhere", "background"])
    async def test_commits_below_the_backstop_leave_the_copy_to_the_daemons_thread(
            self, tmp_path: Path, monkeypatch, mode: str) -> None:
        """The worker's ("elsewhere") and the daemon's own ("background"; its thread kept idle here)."""
        monkeypatch.setattr(checkpoints, "INTERVAL", 30.0)
        monkeypatch.setattr(checkpoints, "IDLE_INTERVAL", 30.0)
        path = tmp_path / "store.sqlite3"
        async with await Store.open(path, checkpoints=mode) as store:
            before = path.stat().st_size
            await self.write_megabytes(store, 8)
            await asyncio.sleep(0.3)
            assert path.stat().st_size == before
            assert Path(f"{path}-wal").stat().st_size >= 8 << 20

    async def test_a_wal_past_the_backstop_is_checkpointed_by_the_commit_and_starts_over(self, tmp_path: Path) -> None:
        """Without a checkpointer keeping up (or with one that never sees the whole WAL copied) it stays bounded."""
        path = tmp_path / "worker.sqlite3"
        async with await Store.open(path, checkpoints="elsewhere") as store:
            await self.write_megabytes(store, 48)
            assert path.stat().st_size >= 40 << 20
            assert Path(f"{path}-wal").stat().st_size < 24 << 20

    async def test_the_daemons_checkpointer_copies_its_commits_soon_after(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setattr(checkpoints, "IDLE_INTERVAL", 30.0)
        path = tmp_path / "daemon.sqlite3"
        async with await Store.open(path, checkpoints="background") as store:
            await self.write_megabytes(store, 8)
            assert await self.grown_to(path, 8 << 20, within=1.0)

    async def test_commits_of_the_worker_are_checkpointed_by_the_daemon(self, tmp_path: Path) -> None:
        path = tmp_path / "shared.sqlite3"
        async with await Store.open(path, checkpoints="background"):
            async with await Store.open(path, checkpoints="elsewhere") as worker:
                await self.write_megabytes(worker, 8)
                assert await self.grown_to(path, 8 << 20, within=5.0)

    async def test_close_stops_the_checkpointer_thread(self, tmp_path: Path) -> None:
        store = await Store.open(tmp_path / "s.sqlite3", checkpoints="background")
        checkpointer = store._checkpointer
        try:
            assert checkpointer is not None and checkpointer.running
        finally:
            await store.close()
        assert not checkpointer.running

    async def test_a_failing_checkpoint_is_logged_once_and_retried(self, tmp_path: Path, caplog) -> None:
        """A store moved away is neither recreated empty nor a reason for the thread to stop."""
        caplog.set_level(logging.INFO, "gatewayd.store")
        path = tmp_path / "moved.sqlite3"
        checkpointer = Checkpointer(path, interval=0.01, idle_interval=0.01)
        try:
            await asyncio.sleep(0.2)
            assert not path.exists()
            assert checkpointer.running
            assert caplog.text.count("checkpointing the store's WAL") == 1
            async with await Store.open(path):
                pass
            deadline = time.monotonic() + 2
            while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert checkpointer.checkpoints > 0
            assert "works again" in caplog.text
        finally:
            await asyncio.to_thread(checkpointer.stop)
