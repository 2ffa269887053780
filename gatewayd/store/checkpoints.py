"""Copying the WAL into the store file, away from the commits that answer SMTP clients.

By default SQLite checkpoints inside the COMMIT that takes the WAL past 1,000
pages, so every few megabytes one unlucky group commit also copies them into
the store file and fsyncs it twice: at 100 KB messages and concurrency 50
that was most of the intake writer's commit time (17 ms instead of 7 for a
5 MB batch) and every 250 in the batch waited for it. One thread per daemon
does them instead with ``PASSIVE`` checkpoints, which never wait for a writer
and never make one wait.

Long-running writers keep an automatic checkpoint at :data:`BACKSTOP_PAGES`.
It finds little left to copy, and it is what lets the WAL start over from
its beginning: that happens at a writer's next transaction after the whole
WAL was copied, which a thread running beside busy writers almost never
sees. Without it the ``-wal`` file grew to 600 MB in three 100 KB bursts;
with it, it stays near 20 MB.

The thread checkpoints at most every :data:`INTERVAL` seconds after a commit
of its process, and every :data:`IDLE_INTERVAL` seconds anyway, for the
commits of the worker process and of CLI commands.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

log = logging.getLogger("gatewayd.store")

Checkpoints = Literal["on_commit", "background", "elsewhere"]
"""Who copies the WAL into the store file for a :class:`~gatewayd.store.db.Database`:

``on_commit``
    SQLite, inside the commit that fills the WAL (short-lived processes: CLI commands).
``background``
    a :class:`Checkpointer` thread of this process (the daemon).
``elsewhere``
    another process's checkpointer (the daemon's worker process, which never outlives the daemon).
"""

# At 65 MB/s of message data this copies about 6 MB at a time, as SQLite's
# 1,000-page threshold would; at low rates it adds at most ten checkpoints a second.
INTERVAL = 0.1
IDLE_INTERVAL = 1.0
# wal_autocheckpoint of the daemon's and the worker's connections (16 MB of 4 KB pages).
BACKSTOP_PAGES = 4000
SQLITE_AUTOCHECKPOINT = 1000  # SQLite's default, kept by "on_commit"


class Checkpointer:
    """A thread with its own connection that runs ``PRAGMA wal_checkpoint(PASSIVE)``."""

    def __init__(self, path: Path, *, interval: float | None = None, idle_interval: float | None = None) -> None:
        self.path = path
        self.checkpoints = 0
        self._interval = INTERVAL if interval is None else interval
        self._idle_interval = IDLE_INTERVAL if idle_interval is None else idle_interval
        self._committed = threading.Event()
        self._stopping = threading.Event()
        self._last_error = ""
        self._thread = threading.Thread(target=self._run, name="store-checkpoints", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called by the writer after each commit; cheap enough for every one."""
        self._committed.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Ends the thread after the checkpoint in progress, if any.

        Closing its connection copies what is left, when it is the store's last
        connection in any process (SQLite then removes the ``-wal`` file).
        """
        self._stopping.set()
        self._committed.set()
        self._thread.join()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        last = time.monotonic()
        try:
            while not self._stopping.is_set():
                self._committed.wait(self._idle_interval)
                pause = last + self._interval - time.monotonic()
                if self._stopping.wait(max(0.0, pause)):
                    break
                self._committed.clear()
                last = time.monotonic()
                conn = self._checkpoint(conn)
        finally:
            if conn is not None:
                conn.close()

    def _checkpoint(self, conn: sqlite3.Connection | None) -> sqlite3.Connection | None:
        """One PASSIVE checkpoint; a failure is logged once and retried at the next turn, on a new connection.

        Any exception is caught: a thread that died here would leave the
        copying to the writers' backstop without a word. The connection is
        opened ``mode=rw``, so a store that was moved away is not recreated empty.
        """
        try:
            if conn is None:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception as exc:
            if str(exc) != self._last_error:
                log.warning("checkpointing the store's WAL into %s failed (retrying): %s", self.path, exc,
                            exc_info=not isinstance(exc, (sqlite3.Error, OSError)))
                self._last_error = str(exc)
            if conn is not None:
                conn.close()
            return None
        if self._last_error:
            log.info("checkpointing the store's WAL into %s works again", self.path)
            self._last_error = ""
        self.checkpoints += 1
        return conn
