"""The SQLite store: one writer with group commit, one reader, typed errors.

Every write goes through :meth:`Store.transact`. Jobs queue up while the
previous batch is being committed, and the next batch runs them all inside one
``BEGIN IMMEDIATE … COMMIT`` with ``synchronous=FULL`` — one fsync for many
SMTP transactions. Each job runs in its own SAVEPOINT, so one failing job
rolls back alone. A job that has been queued runs to completion even if the
caller is cancelled (a client hanging up mid-DATA): it is committed whole or
not at all, never half.

A worker that has many independent writes at hand (the router's batch, the
outbox's delivery results) hands them over together with
:meth:`Database.transact_each`: one job, so one commit, with each part in a
SAVEPOINT of its own, so one failing part still rolls back alone.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import aiosqlite

from ..errors import StoreCorrupt, StoreError, StoreFull, StoreUnavailable
from .schema import LATEST, MIGRATIONS

log = logging.getLogger("gatewayd.store")
T = TypeVar("T")

_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_FULL_CODES = {sqlite3.SQLITE_FULL}
_CORE_TABLES = {"tickets", "messages", "events", "work", "outbox"}  # created by migration 1


def map_error(exc: BaseException) -> StoreError:
    """Translates sqlite3/OS errors into the store's own exception tree."""
    if isinstance(exc, StoreError):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        code &= 0xFF
    text = str(exc).lower()
    if code in _FULL_CODES or "database or disk is full" in text or "no space" in text:
        return StoreFull(str(exc))
    if code in _CORRUPT_CODES or "malformed" in text or "not a database" in text:
        return StoreCorrupt(str(exc))
    return StoreUnavailable(str(exc))


class Tx:
    """The handle a :meth:`Store.transact` job uses; valid only while the job runs."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @property
    def in_transaction(self) -> bool:
        """False once SQLite has aborted the whole transaction (SQLITE_FULL, an I/O error)."""
        return self._db.in_transaction

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs a statement; returns the last inserted rowid."""
        cursor = await self._db.execute(sql, params)
        rowid = cursor.lastrowid or 0
        await cursor.close()
        return rowid

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        async with self._db.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._db.execute(sql, params) as cursor:
            return list(await cursor.fetchall())


@dataclass
class _Job:
    work: Callable[[Tx], Awaitable[Any]]
    future: asyncio.Future[Any]


@dataclass
class CommitStats:
    """Counts for benchmarks and metrics: how well group commit is batching."""

    jobs: int = 0
    commits: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Database:
    """Owns both connections and the committer task; create with :meth:`open` of a subclass."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection,
                 group_limit: int) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._group_limit = group_limit
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = CommitStats()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, path: str | Path, *, group_limit: int = 128, check: bool = False) -> "Self":
        """Opens (creating if absent) and migrates the store.

        An existing file that is not a healthy gatewayd store raises
        :class:`StoreCorrupt` naming it; it is never recreated. ``check`` runs
        ``PRAGMA quick_check`` as well, which the daemon does at start.
        """
        path = Path(path)
        existed = path.exists() and path.stat().st_size > 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise _named(map_error(exc), path) from exc
        reader: aiosqlite.Connection | None = None
        try:
            writer.row_factory = sqlite3.Row
            await _inspect(writer, path, existed, check)
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000"):
                await writer.execute(f"PRAGMA {pragma}")
            await _migrate(writer, path)
            reader = await aiosqlite.connect(path, isolation_level=None)
            reader.row_factory = sqlite3.Row
            await reader.execute("PRAGMA busy_timeout=10000")
            await reader.execute("PRAGMA query_only=ON")
        except BaseException as exc:
            await writer.close()
            if reader is not None:
                await reader.close()
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise _named(map_error(exc), path) from exc
            raise
        store = cls(path, writer, reader, group_limit)
        store._committer = asyncio.get_running_loop().create_task(store._commit_loop(), name="store-committer")
        return store

    async def close(self) -> None:
        """Finishes every queued job, then closes both connections."""
        self._closing = True
        if self._committer is not None:
            self._queue.put_nowait(None)
            await self._committer
            self._committer = None
        await self._reader.close()
        await self._writer.close()

    async def __aenter__(self) -> "Self":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ writing

    async def transact(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Runs ``work`` inside the next group commit and returns its result once durable."""
        if self._closing or self._committer is None or self._committer.done():
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(work, future))
        return await asyncio.shield(future)

    async def transact_each(self, parts: Sequence[Callable[[Tx], Awaitable[Any]]]) -> list[Any]:
        """Runs ``parts`` in order in one job of the next group commit; each part's result or exception, in order.

        Each part runs in its own SAVEPOINT: one that raises is rolled back alone
        and its exception (sqlite3 errors mapped to :class:`StoreError`) takes its
        place in the list, while the others still commit. Raises
        :class:`StoreError` when nothing could be committed at all.
        """
        if not parts:
            return []

        async def each(tx: Tx) -> list[Any]:
            outcomes: list[Any] = []
            for part in parts:
                await tx.execute("SAVEPOINT part")
                try:
                    result = await part(tx)
                except Exception as exc:
                    if not tx.in_transaction:
                        raise
                    await tx.execute("ROLLBACK TO part")
                    await tx.execute("RELEASE part")
                    outcomes.append(map_error(exc) if isinstance(exc, sqlite3.Error) else exc)
                else:
                    await tx.execute("RELEASE part")
                    outcomes.append(result)
            return outcomes
        return await self.transact(each)

    async def _commit_loop(self) -> None:
        while True:
            job = await self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < self._group_limit and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            await self._run_batch(batch)
            if stop:
                return

    async def _run_batch(self, batch: list[_Job]) -> None:
        db = self._writer
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            await db.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            _fail(batch, map_error(exc))
            return
        tx = Tx(db)
        try:
            for index, job in enumerate(batch):
                await db.execute("SAVEPOINT job")
                try:
                    result = await job.work(tx)
                except Exception as exc:
                    if not db.in_transaction:
                        # SQLite aborted the whole transaction (SQLITE_FULL, an I/O error):
                        # there is no savepoint left to roll back to, and the jobs before
                        # this one were undone with it. They fail with this job's error;
                        # the jobs after it have not run yet and get a batch of their own.
                        error = map_error(exc) if isinstance(exc, sqlite3.Error) else StoreUnavailable(str(exc))
                        log.error("store transaction aborted: %s", error)
                        _fail(batch[: index + 1], error)
                        if index + 1 < len(batch):
                            await self._run_batch(batch[index + 1:])
                        return
                    await db.execute("ROLLBACK TO job")
                    await db.execute("RELEASE job")
                    outcomes.append((job, None, exc))
                else:
                    await db.execute("RELEASE job")
                    outcomes.append((job, result, None))
            await db.execute("COMMIT")
        except Exception as exc:
            error = map_error(exc)
            log.error("store commit failed: %s", error)
            try:
                await db.execute("ROLLBACK")
            except Exception:
                log.debug("rollback after failed commit also failed", exc_info=True)
            _fail(batch, error)
            return
        self.stats.jobs += len(batch)
        self.stats.commits += 1
        self.stats.batch_sizes.append(len(batch))
        if len(self.stats.batch_sizes) > 10000:
            del self.stats.batch_sizes[:5000]
        for job, result, error in outcomes:
            if job.future.done():
                continue
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(map_error(error) if isinstance(error, sqlite3.Error) else error)

    # ------------------------------------------------------------------ reading

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        try:
            async with self._reader.execute(sql, params) as cursor:
                return await cursor.fetchone()
        except sqlite3.Error as exc:
            raise map_error(exc) from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._reader.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise map_error(exc) from exc

    async def writable(self) -> bool:
        """True when a write transaction can be started and committed right now."""
        try:
            await self.transact(_probe)
        except StoreError:
            return False
        return True


async def _probe(tx: Tx) -> None:
    await tx.execute("INSERT INTO health (id, probed_at) VALUES (1, ?) "
                     "ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at", (time.time(),))


def _fail(batch: list[_Job], error: BaseException) -> None:
    for job in batch:
        if not job.future.done():
            job.future.set_exception(error)


def _named(error: StoreError, path: Path) -> StoreError:
    return type(error)(f"{path}: {error}")


async def _inspect(db: aiosqlite.Connection, path: Path, existed: bool, check: bool) -> None:
    """Refuses files that are not a gatewayd store we can use."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = row[0] if row else 0
    if version > LATEST:
        raise StoreCorrupt(f"{path}: store schema version {version} is newer than this gatewayd ({LATEST})")
    if existed:
        async with db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cursor:
            tables = {row[0] for row in await cursor.fetchall()}
        # user_version is a free-for-all integer: another application's file may set it too.
        if (version == 0 and tables) or (version > 0 and not _CORE_TABLES <= tables):
            raise StoreCorrupt(f"{path}: is an SQLite file but not a gatewayd store")
    if existed and check:
        async with db.execute("PRAGMA quick_check") as cursor:
            result = [r[0] for r in await cursor.fetchall()]
        if result != ["ok"]:
            raise StoreCorrupt(f"{path}: integrity check failed: {'; '.join(result[:3])}")


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = row[0] if row else 0
    for target in range(version + 1, LATEST + 1):
        log.info("migrating store %s to schema version %d", path, target)
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[target - 1]):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    """Splits a migration into statements (our migrations never put ';' inside literals)."""
    return [s.strip() for s in script.split(";") if s.strip()]
