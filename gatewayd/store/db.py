"""The SQLite store: one writer with group commit, one reader, typed errors.

Every write goes through :meth:`Store.transact`. Jobs queue up while the
previous batch is being committed, and the next batch runs them all inside one
``BEGIN IMMEDIATE … COMMIT`` with ``synchronous=FULL`` — one fsync for many
SMTP transactions. Each job runs in its own SAVEPOINT, so one failing job
rolls back alone. A job that has been queued runs to completion even if the
caller is cancelled (a client hanging up mid-DATA): it is committed whole or
not at all, never half.

Background workers (the router's batches, the outbox's delivery results)
hand many independent writes over at once with :meth:`Database.transact_each`.
Those parts barely make a waiting SMTP client wait: a transaction spends at
most :data:`BACKGROUND_SHARE` seconds on background parts before it takes the
queued :meth:`Database.transact` jobs and commits (more only when nobody is
waiting). So background writes ride along in the commits intake needs anyway,
a ``250`` waits at most about that long for them, and under a steady stream
of SMTP transactions the background still gets its share of every commit.

Jobs run whole in SQLite's thread: under load every round trip to that
thread also waits for a turn of the busy event loop, and the writer's round
trips are the pipeline's narrowest path. A job's awaits on its :class:`Tx`
never suspend there, so a run of queued jobs (each in its own SAVEPOINT) costs
one round trip instead of one per statement. The contract that follows: a job
awaits nothing but its ``Tx`` (anything else fails the job), and it may block
briefly without stalling any SMTP session. A background part that only writes
can also be given as :class:`Writes`. Without aiosqlite's internal
``_execute`` jobs run statement by statement on the loop, with the same
outcome.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import aiosqlite

from ..errors import StoreCorrupt, StoreError, StoreFull, StoreUnavailable
from .schema import LATEST, MIGRATIONS

log = logging.getLogger("gatewayd.store")
T = TypeVar("T")
Statement = tuple[str, Sequence[Any]]

_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_FULL_CODES = {sqlite3.SQLITE_FULL}
_CORE_TABLES = {"tickets", "messages", "events", "work", "outbox"}  # created by migration 1
# Seconds of background writes per transaction (at least one part each). Every
# 250 waits for up to two of these shares: at 4 KB c=10, 3 ms gave 449 msg/s,
# 1 ms 530-623 and 0.5 ms 690, the router and outbox keeping the same pace
# (bench, gatewayd-only runs).
BACKGROUND_SHARE = 0.0005
_BACKGROUND_RUN = 64  # background parts handed to SQLite's thread per trip, at most


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
        row = await self._db.execute_insert(sql, params)
        return (row[0] if row else 0) or 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row; the query should return one or a few (all are fetched, in one round trip)."""
        rows = await self._db.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(await self._db.execute_fetchall(sql, params))


@dataclass(frozen=True)
class Writes:
    """A background part that only writes: its statements, in order (its result is None)."""

    statements: tuple[Statement, ...]


Part = Callable[[Tx], Awaitable[Any]] | Writes


@dataclass
class _Job:
    work: Part
    future: asyncio.Future[Any]
    background: bool = False


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
        self._waiting: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._ready = asyncio.Event()
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
            self._ready.set()
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
        """Runs ``work`` inside the next group commit and returns its result once durable.

        ``work`` runs in SQLite's thread and may await only its ``Tx``.
        """
        self._check_open()
        job = _Job(work, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self._ready.set()
        return await asyncio.shield(job.future)

    async def transact_each(self, parts: Sequence[Part]) -> list[Any]:
        """Runs background ``parts`` in order, in the coming commits; each part's result or exception, in order.

        Each part runs in its own SAVEPOINT: one that raises is rolled back
        alone and its exception (sqlite3 errors mapped to :class:`StoreError`)
        takes its place in the list. A :class:`StoreError` in the list means
        that part was not committed, whichever way it failed. Parts yield to
        :meth:`transact` jobs and may be split over more than one commit.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        jobs = [_Job(part, loop.create_future(), background=True) for part in parts]
        self._background.extend(jobs)
        self._ready.set()
        outcomes = await asyncio.shield(asyncio.gather(*(job.future for job in jobs), return_exceptions=True))
        return [map_error(o) if isinstance(o, sqlite3.Error) else o for o in outcomes]

    def _check_open(self) -> None:
        if self._closing or self._committer is None or self._committer.done():
            raise StoreUnavailable("the store is closed")

    async def _commit_loop(self) -> None:
        while True:
            if self._waiting or self._background:
                await self._run_batch()
            elif self._closing:
                return
            else:
                self._ready.clear()
                await self._ready.wait()

    def _next_job(self, batch: list[_Job], background_spent: float) -> _Job | None:
        """Background parts for up to BACKGROUND_SHARE seconds, then the waiting callers, then
        more background only if no caller waits on this transaction."""
        if len(batch) >= self._group_limit:
            return None
        if self._background and background_spent < BACKGROUND_SHARE:
            return self._background.popleft()
        if self._waiting:
            return self._waiting.popleft()
        if self._background and all(job.background for job in batch):
            return self._background.popleft()
        return None

    async def _run_batch(self) -> None:
        db = self._writer
        try:
            await db.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            await _roll_back(db)
            refused: list[_Job] = []
            while (job := self._next_job(refused, 0.0)) is not None:
                refused.append(job)
            _fail(refused, map_error(exc))
            return
        tx = Tx(db)
        batch: list[_Job] = []
        background_spent = 0.0
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            while (job := self._next_job(batch, background_spent)) is not None:
                started = time.monotonic()
                run = self._run_of(job, len(batch))
                try:
                    if _ONE_TRIP:
                        budget = BACKGROUND_SHARE if job.background else None
                        done = await _run_in_thread(db, run, budget)
                        # What the time share left over waits for the next turn, first in line.
                        self._background.extendleft(reversed(run[len(done):]))
                        batch.extend(run[:len(done)])
                        outcomes.extend(done)
                    else:
                        batch.append(job)
                        outcomes.append(await _run_job(db, tx, job))
                    if job.background:
                        background_spent += time.monotonic() - started
                except Exception as exc:
                    # SQLite aborted the whole transaction (SQLITE_FULL, an I/O error):
                    # there is no savepoint left to roll back to, and the jobs before
                    # this one were undone with it. They fail with this job's error;
                    # the jobs still queued get a transaction of their own. Anything
                    # else (a savepoint that could not be released or rolled back)
                    # leaves the transaction open: it is rolled back here, or every
                    # later BEGIN would fail until a restart.
                    ran = run
                    if isinstance(exc, _Aborted):
                        ran, exc = run[:exc.index + 1], exc.error
                        for later in reversed(run[len(ran):]):
                            (self._background if later.background else self._waiting).appendleft(later)
                    error = map_error(exc) if isinstance(exc, sqlite3.Error) else StoreUnavailable(str(exc))
                    log.error("store transaction aborted: %s", error)
                    await _roll_back(db)
                    _fail(batch + ran, error)
                    return
            await db.execute("COMMIT")
        except Exception as exc:
            error = map_error(exc)
            log.error("store commit failed: %s", error)
            await _roll_back(db)
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

    def _run_of(self, first: _Job, taken: int) -> list[_Job]:
        """``first`` and the jobs queued behind it of the same kind: one round trip for all.

        Callers' jobs go together whole; background parts in runs short
        enough for the time share to be checked between them.
        """
        run = [first]
        if _ONE_TRIP:
            queue, most = (self._background, _BACKGROUND_RUN) if first.background else (self._waiting, self._group_limit)
            while queue and len(run) < most and taken + len(run) < self._group_limit:
                run.append(queue.popleft())
        return run

    # ------------------------------------------------------------------ reading

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row; the query should return one or a few (all are fetched, in one round trip)."""
        return next(iter(await self.fetchall(sql, params)), None)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return list(await self._reader.execute_fetchall(sql, params))
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


async def _run_job(db: aiosqlite.Connection, tx: Tx, job: _Job) -> tuple[_Job, Any, BaseException | None]:
    """Runs one job in its own SAVEPOINT; raises only when SQLite aborted the whole transaction."""
    await db.execute("SAVEPOINT job")
    try:
        work = job.work
        result = await (_statements_of(work)(tx) if isinstance(work, Writes) else work(tx))
    except Exception as exc:
        if not db.in_transaction:
            raise
        await db.execute("ROLLBACK TO job")
        await db.execute("RELEASE job")
        return job, None, exc
    await db.execute("RELEASE job")
    return job, result, None


def _statements_of(writes: Writes) -> Callable[[Tx], Awaitable[None]]:
    async def work(tx: Tx) -> None:
        for sql, params in writes.statements:
            await tx.execute(sql, params)
    return work


class _ThreadTx(Tx):
    """The :class:`Tx` of a job that runs whole in SQLite's thread: the same calls, never suspending."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).lastrowid or 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        return self._conn.execute(sql, params).fetchone()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, params).fetchall()


class _Aborted(Exception):
    """SQLite aborted the transaction while ``run[index]`` ran; the jobs after it never started."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


def _drive(job: Coroutine[Any, Any, T]) -> T:
    """Runs a job coroutine to its end in the calling thread.

    Its awaits are :class:`_ThreadTx` calls, which never suspend, so one
    ``send`` finishes it. A job that awaits anything else is a defect: it is
    stopped and fails, and its savepoint is rolled back.
    """
    try:
        job.send(None)
    except StopIteration as done:
        return done.value
    job.close()
    raise RuntimeError("a store job awaited something other than its transaction")


async def _run_in_thread(db: aiosqlite.Connection, run: list[_Job],
                         budget: float | None) -> list[tuple[_Job, Any, BaseException | None]]:
    """Runs ``run`` in one trip to SQLite's thread, each job in its own SAVEPOINT.

    Under load every trip also waits for a turn of the busy event loop, so a
    job of fifteen statements costs one such wait instead of fifteen. With a
    ``budget`` (seconds), jobs stop being started once it is spent; the
    outcomes cover the jobs that ran, in order. Raises when SQLite aborted the
    whole transaction.
    """
    def execute() -> list[tuple[_Job, Any, BaseException | None]]:
        conn: sqlite3.Connection = db._conn
        tx = _ThreadTx(conn)
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        deadline = None if budget is None else time.monotonic() + budget
        for job in run:
            if outcomes and deadline is not None and time.monotonic() >= deadline:
                break
            conn.execute("SAVEPOINT job")
            try:
                work = job.work
                result = _drive(_statements_of(work)(tx) if isinstance(work, Writes) else work(tx))
            except Exception as exc:
                if not conn.in_transaction:
                    raise _Aborted(len(outcomes), exc) from exc
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                outcomes.append((job, None, exc))
            else:
                conn.execute("RELEASE job")
                outcomes.append((job, result, None))
        return outcomes
    return await db._execute(execute)


# aiosqlite has no public way to run a function in its thread; Connection._execute
# (its internal queue, unchanged since 0.11) does it. Without it, jobs run statement
# by statement on the loop: slower, not different.
_ONE_TRIP = callable(getattr(aiosqlite.Connection, "_execute", None))


async def _roll_back(db: aiosqlite.Connection) -> None:
    """Ends whatever transaction is still open on the writer; never raises."""
    if not db.in_transaction:
        return
    try:
        await db.execute("ROLLBACK")
    except Exception:
        log.debug("rollback failed", exc_info=True)


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
