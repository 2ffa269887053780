"""The SQLite store: one writer thread with group commit, one reader, typed errors.

Every write goes through :meth:`Database.transact`. The writer connection
lives in a thread of its own. Jobs queue up while it commits the previous
batch, and the next batch runs them all inside one ``BEGIN IMMEDIATE …
COMMIT`` with ``synchronous=FULL``: one fsync for many SMTP transactions.
Each job runs in its own SAVEPOINT, so one failing job rolls back alone. A
job that has been queued runs to completion even if the caller is cancelled
(a client hanging up mid-DATA): it is committed whole or not at all, never
half.

Why a thread of its own rather than aiosqlite's: under load every trip to
aiosqlite's thread also waits for a turn of the busy event loop, and a batch
took four of them (BEGIN, background parts, callers, COMMIT) before its 250s
could go out. The writer thread starts, fills and commits a batch without the
loop; the loop only hands jobs over (a deque and an event) and takes the
results back, one callback per batch. Callers who arrive while a batch is
being filled still join it. The reader stays on aiosqlite.

The contract that follows: a job runs in the writer thread and awaits nothing
but its :class:`Tx` (anything else fails the job); it may block briefly
without stalling any SMTP session.

Background workers (the router's batches, the outbox's delivery results)
hand many independent writes over at once with :meth:`Database.transact_each`.
Those parts barely make a waiting SMTP client wait: a transaction spends at
most :data:`BACKGROUND_SHARE` seconds on background parts before it takes the
queued :meth:`Database.transact` jobs and commits (more only when nobody is
waiting). So background writes ride along in the commits intake needs anyway,
a ``250`` waits at most about that long for them, and under a steady stream
of SMTP transactions the background still gets its share of every commit.

Other processes write the same file: the daemon's worker (routing and
delivery) and CLI commands. Writers take turns through :class:`StoreLocks`,
which hands the turn over without SQLite's polling; a batch of background
parts ends after its share when a writer of another process waits. The
daemon's commits leave checkpointing the WAL to a thread of its own
(:mod:`.checkpoints`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import aiosqlite

from ..errors import StoreCorrupt, StoreError, StoreFull, StoreUnavailable
from .checkpoints import BACKSTOP_PAGES, SQLITE_AUTOCHECKPOINT, Checkpointer, Checkpoints
from .locks import StoreLocks
from .schema import LATEST, MIGRATIONS

log = logging.getLogger("gatewayd.store")
T = TypeVar("T")
Statement = tuple[str, Sequence[Any]]
Outcome = tuple["_Job", Any, BaseException | None]

_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_FULL_CODES = {sqlite3.SQLITE_FULL}
_CORE_TABLES = {"tickets", "messages", "events", "work", "outbox"}  # created by migration 1
# Seconds of background writes per transaction (at least one part each). Every
# 250 waits for up to two of these shares: at 4 KB c=10, 3 ms gave 449 msg/s,
# 1 ms 530-623 and 0.5 ms 690, the router and outbox keeping the same pace
# (bench, gatewayd-only runs).
BACKGROUND_SHARE = 0.0005
# How long a writer waits for another (SQLite's lock, or the write turn) before its jobs fail.
BUSY_TIMEOUT = 10.0
_PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", f"busy_timeout={BUSY_TIMEOUT * 1000:.0f}")


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
    """The handle a :meth:`Database.transact` job uses; valid only while the job runs.

    Its calls run on the writer connection in the writer thread and never
    suspend; they are coroutines so that jobs read like any other store code.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def in_transaction(self) -> bool:
        """False once SQLite has aborted the whole transaction (SQLITE_FULL, an I/O error)."""
        return self._conn.in_transaction

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs a statement; returns the last inserted rowid."""
        return self._conn.execute(sql, params).lastrowid or 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        return self._conn.execute(sql, params).fetchone()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, params).fetchall()


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
    """The writer thread and the reader connection; create with :meth:`open` of a subclass."""

    def __init__(self, path: Path, writer: "_Writer", reader: "_Reader",
                 checkpointer: Checkpointer | None = None) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._checkpointer = checkpointer
        self._closing = False

    @property
    def stats(self) -> CommitStats:
        return self._writer.stats

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, path: str | Path, *, group_limit: int = 128, check: bool = False,
                   inline_reads: bool = False, checkpoints: Checkpoints = "on_commit") -> "Self":
        """Opens (creating if absent) and migrates the store.

        An existing file that is not a healthy gatewayd store raises
        :class:`StoreCorrupt` naming it; it is never recreated. ``check`` runs
        ``PRAGMA quick_check`` as well, which the daemon does at start.
        ``inline_reads`` reads on the event loop's thread instead of a reader
        thread: for the worker process, whose loop serves no SMTP client, the
        hand-over to a thread and back costs more than an indexed read.
        ``checkpoints`` says who copies the WAL into the store file
        (:data:`~gatewayd.store.checkpoints.Checkpoints`).
        """
        path = Path(path)
        writer = _Writer(path, group_limit, check, asyncio.get_running_loop(),
                         autocheckpoint_pages=SQLITE_AUTOCHECKPOINT if checkpoints == "on_commit" else BACKSTOP_PAGES)
        await writer.opened()
        try:
            reader = _InlineReader.open(path) if inline_reads else await _ThreadReader.open(path)
        except (OSError, sqlite3.Error) as exc:
            await writer.stop()
            raise _named(map_error(exc), path) from exc
        except BaseException:
            await writer.stop()
            raise
        checkpointer = None
        if checkpoints == "background":
            try:
                checkpointer = writer.checkpointer = Checkpointer(path)
            except BaseException:
                await writer.stop()
                await reader.close()
                raise
        return cls(path, writer, reader, checkpointer)

    async def close(self) -> None:
        """Finishes every queued job, then closes the connections."""
        self._closing = True
        try:
            await self._writer.stop()
            await self._reader.close()
        finally:
            if self._checkpointer is not None:
                await asyncio.to_thread(self._checkpointer.stop)

    async def __aenter__(self) -> "Self":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ writing

    async def transact(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Runs ``work`` inside the next group commit and returns its result once durable.

        ``work`` runs in the writer thread and may await only its ``Tx``.
        """
        self._check_open()
        job = _Job(work, asyncio.get_running_loop().create_future())
        self._writer.submit((job,))
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
        self._writer.submit(jobs)
        outcomes = await asyncio.shield(asyncio.gather(*(job.future for job in jobs), return_exceptions=True))
        return [map_error(o) if isinstance(o, sqlite3.Error) else o for o in outcomes]

    def _check_open(self) -> None:
        if self._closing or not self._writer.running:
            raise StoreUnavailable("the store is closed")

    # ------------------------------------------------------------------ reading

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row; the query should return one or a few (all are fetched, in one round trip)."""
        return next(iter(await self.fetchall(sql, params)), None)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return await self._reader.fetchall(sql, params)
        except sqlite3.Error as exc:
            raise map_error(exc) from exc

    async def writable(self) -> bool:
        """True when a write transaction can be started and committed right now."""
        try:
            await self.transact(_probe)
        except StoreError:
            return False
        return True


class _Reader(Protocol):
    """The read-only connection: one for the store's lifetime, every read through it."""

    async def fetchall(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]: ...

    async def close(self) -> None: ...


class _ThreadReader:
    """Reads in aiosqlite's thread, so that a long one never pauses the SMTP sessions on the loop."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, path: Path) -> "_ThreadReader":
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000:.0f}")
            await conn.execute("PRAGMA query_only=ON")
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    async def fetchall(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        return list(await self._conn.execute_fetchall(sql, params))

    async def close(self) -> None:
        await self._conn.close()


class _InlineReader:
    """Reads on the calling thread (see ``inline_reads``); a WAL reader never waits for a writer."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, path: Path) -> "_InlineReader":
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000:.0f}")
            conn.execute("PRAGMA query_only=ON")
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    async def fetchall(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        return self._conn.execute(sql, params).fetchall()

    async def close(self) -> None:
        self._conn.close()


async def _probe(tx: Tx) -> None:
    await tx.execute("INSERT INTO health (id, probed_at) VALUES (1, ?) "
                     "ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at", (time.time(),))


class _Writer:
    """The one connection that writes, and the thread that owns it for the store's lifetime.

    The event loop only appends jobs and sets an event; results come back
    with one ``call_soon_threadsafe`` per batch.
    """

    def __init__(self, path: Path, group_limit: int, check: bool, loop: asyncio.AbstractEventLoop, *,
                 autocheckpoint_pages: int) -> None:
        self.path = path
        self.stats = CommitStats()
        self.checkpointer: Checkpointer | None = None
        self._autocheckpoint_pages = autocheckpoint_pages
        self._group_limit = group_limit
        self._check = check
        self._loop = loop
        self._waiting: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._wake = threading.Event()
        # Guards the queues against the thread's last drain: a job handed over after it fails at once.
        self._lock = threading.Lock()
        self._dead = False
        self._closing = False
        self._locks: StoreLocks  # opened in the thread, next to the store
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return not self._closing and self._thread.is_alive()

    async def opened(self) -> None:
        """Waits for the writer connection: opened, checked and migrated (or the reason it is not)."""
        await asyncio.wrap_future(self._opened)

    async def stop(self) -> None:
        """Runs every queued job, closes the connection and ends the thread."""
        self._closing = True
        self._wake.set()
        await asyncio.shield(asyncio.wrap_future(self._stopped))

    def submit(self, jobs: Iterable[_Job]) -> None:
        """Called on the loop; the writer takes the jobs into its next batch."""
        with self._lock:
            if self._dead:
                _settle(_failed(list(jobs), StoreUnavailable("the store is closed")))
                return
            for job in jobs:
                (self._background if job.background else self._waiting).append(job)
        self._wake.set()

    def control(self, conn: sqlite3.Connection, sql: str) -> None:
        """BEGIN, COMMIT and ROLLBACK go through here (the fault tests make a COMMIT fail)."""
        conn.execute(sql)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            conn = _connect(self.path, self._check, self._autocheckpoint_pages)
            try:
                self._locks = StoreLocks(self.path)
            except OSError as exc:
                conn.close()
                raise _named(map_error(exc), self.path) from exc
        except BaseException as exc:
            self._dead = True
            if self._opened.set_running_or_notify_cancel():
                self._opened.set_exception(exc)
            self._stopped.set_result(None)
            return
        try:
            if not self._opened.set_running_or_notify_cancel():
                return  # open() was cancelled (a stop during start-up): nobody will use this store
            self._opened.set_result(None)
            self._serve(conn)
        finally:
            conn.close()
            self._locks.close()
            with self._lock:
                self._dead = True
                left = [*self._waiting, *self._background]
                self._waiting.clear()
                self._background.clear()
            self._deliver(_failed(left, StoreUnavailable("the store is closed")))
            self._stopped.set_result(None)

    def _serve(self, conn: sqlite3.Connection) -> None:
        tx = Tx(conn)
        while True:
            if self._waiting or self._background:
                self._deliver(self._run_batch(conn, tx))
            elif self._closing:
                return
            else:
                self._wake.wait()
                self._wake.clear()

    def _next_job(self, batch: list[_Job], background_spent: float) -> _Job | None:
        """Background parts for up to BACKGROUND_SHARE seconds, then the waiting callers (also those
        arriving meanwhile), then more background only if no caller waits on this transaction."""
        if len(batch) >= self._group_limit:
            return None
        if self._background and background_spent < BACKGROUND_SHARE:
            return self._background.popleft()
        if self._waiting:
            return self._waiting.popleft()
        if self._background and all(job.background for job in batch) and not self._locks.others_waiting():
            return self._background.popleft()
        return None

    def _run_batch(self, conn: sqlite3.Connection, tx: Tx) -> list[Outcome]:
        if conn.in_transaction:
            _roll_back(conn)  # a ROLLBACK that failed last time must not cost this batch its BEGIN
        try:
            turn = self._locks.take_turn(BUSY_TIMEOUT)
        except OSError as exc:
            return self._refuse(exc)
        if not turn:
            return self._refuse(StoreUnavailable(
                f"another process has held the store's write turn for over {BUSY_TIMEOUT:.0f}s "
                f"({self._locks.path}); a writer stopped inside its transaction?"))
        try:
            return self._run_turn(conn, tx)
        finally:
            self._locks.end_turn()

    def _refuse(self, exc: Exception) -> list[Outcome]:
        """No transaction could begin: the jobs a batch would have taken fail with the reason."""
        refused: list[_Job] = []
        while (job := self._next_job(refused, 0.0)) is not None:
            refused.append(job)
        return _failed(refused, map_error(exc))

    def _run_turn(self, conn: sqlite3.Connection, tx: Tx) -> list[Outcome]:
        try:
            self.control(conn, "BEGIN IMMEDIATE")
        except Exception as exc:
            _roll_back(conn)
            return self._refuse(exc)
        batch: list[_Job] = []
        outcomes: list[Outcome] = []
        background_spent = 0.0
        try:
            while (job := self._next_job(batch, background_spent)) is not None:
                started = time.monotonic()
                batch.append(job)
                outcomes.append(_run_job(conn, tx, job))
                if job.background:
                    background_spent += time.monotonic() - started
            self.control(conn, "COMMIT")
            if self.checkpointer is not None:
                self.checkpointer.committed()
        except BaseException as exc:
            # SQLite aborted the whole transaction (SQLITE_FULL, an I/O error, a
            # failed COMMIT): the batch's jobs were undone with it and fail with
            # this error; the jobs still queued get a transaction of their own.
            # Anything else (a savepoint that could not be released or rolled
            # back) leaves the transaction open: it is rolled back here, or
            # every later BEGIN would fail until a restart.
            if isinstance(exc, _Aborted):
                exc = exc.error
            error = map_error(exc) if isinstance(exc, sqlite3.Error) else StoreUnavailable(str(exc) or repr(exc))
            log.error("store transaction failed: %s", error)
            _roll_back(conn)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self._deliver(_failed(batch, error))
                raise
            return _failed(batch, error)
        self.stats.jobs += len(batch)
        self.stats.commits += 1
        self.stats.batch_sizes.append(len(batch))
        if len(self.stats.batch_sizes) > 10000:
            del self.stats.batch_sizes[:5000]
        return outcomes

    def _deliver(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        try:
            self._loop.call_soon_threadsafe(_settle, outcomes)
        except RuntimeError:
            log.debug("event loop closed; %d store results dropped", len(outcomes))


def _run_job(conn: sqlite3.Connection, tx: Tx, job: _Job) -> Outcome:
    """Runs one job in its own SAVEPOINT; raises :class:`_Aborted` when SQLite aborted the whole transaction."""
    conn.execute("SAVEPOINT job")
    try:
        work = job.work
        result = _drive(_statements_of(work)(tx) if isinstance(work, Writes) else work(tx))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a job's CancelledError (an awaited future was cancelled) fails it alone
        if not conn.in_transaction:
            raise _Aborted(exc) from exc
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return job, None, exc if isinstance(exc, Exception) else RuntimeError(f"a store job raised {exc!r}")
    conn.execute("RELEASE job")
    return job, result, None


def _statements_of(writes: Writes) -> Callable[[Tx], Awaitable[None]]:
    async def work(tx: Tx) -> None:
        for sql, params in writes.statements:
            await tx.execute(sql, params)
    return work


class _Aborted(Exception):
    """SQLite aborted the transaction while a job ran."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _drive(job: Coroutine[Any, Any, T]) -> T:
    """Runs a job coroutine to its end in the calling thread.

    Its awaits are :class:`Tx` calls, which never suspend, so one ``send``
    finishes it. A job that awaits anything else is a defect: it is stopped
    and fails, and its savepoint is rolled back.
    """
    try:
        job.send(None)
    except StopIteration as done:
        return done.value
    job.close()
    raise RuntimeError("a store job awaited something other than its transaction")


def _settle(outcomes: list[Outcome]) -> None:
    """On the loop: hands every job of a batch its result or error."""
    for job, result, error in outcomes:
        if job.future.done():
            continue
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(map_error(error) if isinstance(error, sqlite3.Error) else error)


def _failed(jobs: list[_Job], error: BaseException) -> list[Outcome]:
    return [(job, None, error) for job in jobs]


def _roll_back(conn: sqlite3.Connection) -> None:
    """Ends whatever transaction is still open on the writer; never raises."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except Exception:
        log.debug("rollback failed", exc_info=True)


def _connect(path: Path, check: bool, autocheckpoint_pages: int) -> sqlite3.Connection:
    """The writer connection, after refusing files that are not a healthy gatewayd store and migrating.

    Its commits checkpoint the WAL once it holds ``autocheckpoint_pages``.
    """
    existed = path.exists() and path.stat().st_size > 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise _named(map_error(exc), path) from exc
    try:
        conn.row_factory = sqlite3.Row
        _inspect(conn, path, existed, check)
        for pragma in _PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        conn.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint_pages}")
        _migrate(conn, path)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, (sqlite3.Error, OSError)):
            raise _named(map_error(exc), path) from exc
        raise
    return conn


def _named(error: StoreError, path: Path) -> StoreError:
    return type(error)(f"{path}: {error}")


def _inspect(db: sqlite3.Connection, path: Path, existed: bool, check: bool) -> None:
    """Refuses files that are not a gatewayd store we can use."""
    row = db.execute("PRAGMA user_version").fetchone()
    version = row[0] if row else 0
    if version > LATEST:
        raise StoreCorrupt(f"{path}: store schema version {version} is newer than this gatewayd ({LATEST})")
    if existed:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        # user_version is a free-for-all integer: another application's file may set it too.
        if (version == 0 and tables) or (version > 0 and not _CORE_TABLES <= tables):
            raise StoreCorrupt(f"{path}: is an SQLite file but not a gatewayd store")
    if existed and check:
        result = [r[0] for r in db.execute("PRAGMA quick_check")]
        if result != ["ok"]:
            raise StoreCorrupt(f"{path}: integrity check failed: {'; '.join(result[:3])}")


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    row = db.execute("PRAGMA user_version").fetchone()
    version = row[0] if row else 0
    for target in range(version + 1, LATEST + 1):
        log.info("migrating store %s to schema version %d", path, target)
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[target - 1]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    """Splits a migration into statements (our migrations never put ';' inside literals)."""
    return [s.strip() for s in script.split(";") if s.strip()]
