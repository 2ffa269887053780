"""``gatewayd store backup PATH``: a consistent copy of the live store, taken online.

SQLite's backup API copies the pages under one read transaction: in WAL mode
that is a snapshot of a single commit, taken without blocking the daemon's
writer, so intake keeps answering while the copy is made. Copying the file
with ``cp`` instead can tear a page or miss the WAL.

The copy is written beside the target, checked (``integrity_check``), switched
to a rollback journal so it is one self-contained file, fsynced, and only then
renamed into place: a PATH that exists is always a complete, verified backup.

:func:`backup` blocks for as long as the copy takes; the CLI runs it in its own
process, and code on an event loop must run it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError

_BUSY_TIMEOUT_MS = 10_000


class BackupError(StoreError):
    """No backup was made; the store is untouched and no file is left at the target."""


@dataclass(frozen=True)
class BackupResult:
    target: Path
    size: int
    tickets: int
    schema_version: int


def backup(source: Path, target: Path) -> BackupResult:
    """Copies the store at ``source`` to ``target`` (which must not exist) and verifies the copy."""
    source, target = Path(source), Path(target)
    if target.exists():
        raise BackupError(f"{target} exists; refusing to overwrite it")
    if not source.is_file():
        raise BackupError(f"{source}: no such store")
    partial = target.with_name(f".{target.name}.partial")
    try:
        result = _copy(source, partial, target)
        _durable_rename(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return result


def _copy(source: Path, partial: Path, target: Path) -> BackupResult:
    # mode=rw: opening must never create a missing store (mode=ro cannot read a WAL store
    # whose -shm file belongs to another user).
    try:
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise BackupError(f"{source}: {exc}") from exc
    try:
        src.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        version = src.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 or "tickets" not in tables:
            raise BackupError(f"{source}: not a gatewayd store")
        partial.unlink(missing_ok=True)
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
            problems = [r[0] for r in dst.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise BackupError(f"{target}: the copy failed its integrity check: {'; '.join(problems[:3])}")
            tickets = dst.execute("SELECT count(*) FROM tickets").fetchone()[0]
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise BackupError(f"backup of {source} failed: {exc}") from exc
    finally:
        src.close()
    return BackupResult(target=target, size=partial.stat().st_size, tickets=tickets, schema_version=version)


def _durable_rename(partial: Path, target: Path) -> None:
    with partial.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
