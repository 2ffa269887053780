"""Locks between the processes that share one store file: the daemon, its worker, the CLI.

SQLite serialises writers by itself, but its busy handler polls: a writer that
finds the database locked sleeps 1, 2, 5 … 100 ms and tries again. Two busy
writers (intake in the daemon, routing and delivery in the worker) would lose
milliseconds per commit that way, and the one that sleeps longer can starve.
These locks on ``<store>.lock`` hand the write turn over without polling:

* byte 0, the *turn*, is held from ``BEGIN`` to ``COMMIT``;
* byte 1, the *queue*, is held by a writer while it waits for the turn. The
  writer that just committed must take the queue before the turn again, so it
  lines up behind one that is already waiting instead of taking the turn back;
  and a writer can see that somebody waits (to end its batch early);
* byte 2, the *worker* byte, is held by the worker process for its lifetime, so
  a second worker (a restart while the old one is still finishing) waits
  instead of delivering the same outbox items twice.

They are open-file-description locks (Linux ≥ 3.15): they belong to the open
file, not to the process, so two stores open in one process exclude each
other as well, and closing some other descriptor of the file drops nothing.
A process that dies releases its locks with its descriptors. A writer that
stops inside its transaction (SIGSTOP, a debugger) keeps them: the others
give up after a deadline, as SQLite's busy timeout would, instead of waiting
for ever.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from pathlib import Path

# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padded as in C.
_FLOCK = "hhqqi4x"
_TURN, _QUEUE, _WORKER = 0, 1, 2


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


class StoreLocks:
    """One open descriptor of ``<store>.lock`` and the byte locks taken through it."""

    def __init__(self, store: Path) -> None:
        self.path = lock_path(store)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _same_owner(self._fd, store)
        except OSError:
            os.close(self._fd)
            raise
        # A blocking wait for the turn runs in a helper thread of this descriptor,
        # so the writer can give up on it; a later writer adopts a wait in progress.
        self._waits = threading.Condition()
        self._helper: threading.Thread | None = None
        self._waiting = False
        self._wanted = False
        self._granted = False
        self._closing = False

    def take_turn(self, timeout: float) -> bool:
        """Waits until this writer may begin a write transaction, in arrival order.

        False when the turn did not come within ``timeout`` seconds.
        """
        with self._waits:
            if not self._waiting and self._try_turn():
                return True
            if self._helper is None:
                helper = threading.Thread(target=self._help, name="store-turn", daemon=True)
                try:
                    helper.start()
                except RuntimeError as exc:  # no thread to be had (TasksMax, RLIMIT_NPROC)
                    raise OSError(errno.EAGAIN, f"cannot wait for the store's write turn: {exc}") from exc
                self._helper = helper
            self._wanted = True
            if not self._waiting:
                self._waiting = True
                self._waits.notify_all()
            granted = self._waits.wait_for(lambda: self._granted, timeout)
            self._wanted = False
            self._granted = False
            return granted

    def end_turn(self) -> None:
        self._set(_TURN, fcntl.F_UNLCK)

    def others_waiting(self) -> bool:
        """Whether another writer waits for the turn (only meaningful while holding it)."""
        return self._holder(_QUEUE)

    def hold_worker(self) -> bool:
        """Takes the worker byte if it is free; False while another worker holds it."""
        try:
            self._set(_WORKER, fcntl.F_WRLCK)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        """Releases every lock taken through this descriptor.

        A wait for the turn still in progress keeps the descriptor until it ends,
        so that it never acts on a number that was closed and reused meanwhile.
        """
        with self._waits:
            self._closing = True
            self._waits.notify_all()
            if not self._waiting:
                self._close_descriptor()

    def _close_descriptor(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _try_turn(self) -> bool:
        """The turn at once if nobody holds it or waits for it (the queue byte comes first)."""
        try:
            self._set(_QUEUE, fcntl.F_WRLCK)
        except BlockingIOError:
            return False
        try:
            self._set(_TURN, fcntl.F_WRLCK)
        except BlockingIOError:
            return False
        finally:
            self._set(_QUEUE, fcntl.F_UNLCK)
        return True

    def _help(self) -> None:
        """The helper thread: for each wait asked for, queue, wait for the turn, and hand it to the
        writer that still wants it (or give it back)."""
        while True:
            with self._waits:
                self._waits.wait_for(lambda: self._waiting or self._closing)
                if not self._waiting:
                    return
            got = self._wait_for_turn()
            with self._waits:
                self._waiting = False
                if got and self._wanted and not self._closing:
                    self._granted = True
                    self._waits.notify_all()
                elif got:
                    self.end_turn()  # the writer gave up meanwhile
                if self._closing:
                    self._close_descriptor()
                    return

    def _wait_for_turn(self) -> bool:
        try:
            self._set(_QUEUE, fcntl.F_WRLCK, wait=True)
            try:
                self._set(_TURN, fcntl.F_WRLCK, wait=True)
            finally:
                self._set(_QUEUE, fcntl.F_UNLCK)
        except OSError:
            return False
        return True

    def _set(self, byte: int, kind: int, *, wait: bool = False) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, "the store's lock file is closed")
        command = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
        try:
            fcntl.fcntl(self._fd, command, struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0))
        except PermissionError as exc:  # some systems answer EACCES instead of EAGAIN for a held lock
            raise BlockingIOError(*exc.args) from exc

    def _holder(self, byte: int) -> bool:
        answer = fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK


def _same_owner(fd: int, store: Path) -> None:
    """Root (a CLI command run with sudo) creates the lock file for the store's owner, as SQLite does
    for ``-wal`` and ``-shm``: a root-owned 0600 lock file would keep the service from opening it."""
    if os.geteuid() != 0:
        return
    owner = os.stat(store if store.exists() else store.parent)
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (owner.st_uid, owner.st_gid):
        os.fchown(fd, owner.st_uid, owner.st_gid)
