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
A process that dies releases its locks with its descriptors.
"""

from __future__ import annotations

import fcntl
import os
import struct
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

    def take_turn(self) -> None:
        """Blocks until this writer may begin a write transaction, in arrival order."""
        self._set(_QUEUE, fcntl.F_WRLCK, wait=True)
        try:
            self._set(_TURN, fcntl.F_WRLCK, wait=True)
        finally:
            self._set(_QUEUE, fcntl.F_UNLCK)

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
        """Releases every lock taken through this descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _set(self, byte: int, kind: int, *, wait: bool = False) -> None:
        command = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
        try:
            fcntl.fcntl(self._fd, command, struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0))
        except PermissionError as exc:  # some systems answer EACCES instead of EAGAIN for a held lock
            raise BlockingIOError(*exc.args) from exc

    def _holder(self, byte: int) -> bool:
        answer = fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
