"""Writers of different processes take turns on the store without polling, in arrival order."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gatewayd.errors import StoreUnavailable
from gatewayd.store import Store, Tx
from gatewayd.store import db as db_module
from gatewayd.store.locks import StoreLocks, lock_path


def in_thread(target) -> threading.Thread:  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_the_lock_file_sits_next_to_the_store(tmp_path: Path) -> None:
    assert lock_path(tmp_path / "gatewayd.sqlite3") == tmp_path / "gatewayd.sqlite3.lock"


def test_a_writer_waits_for_the_turn_and_gets_it_as_soon_as_it_ends(tmp_path: Path) -> None:
    first, second = StoreLocks(tmp_path / "s"), StoreLocks(tmp_path / "s")
    assert first.take_turn(5)
    got: list[float] = []
    waiter = in_thread(lambda: (second.take_turn(5), got.append(time.monotonic())))
    time.sleep(0.2)
    assert not got, "the turn is taken"
    assert first.others_waiting()
    ended = time.monotonic()
    first.end_turn()
    waiter.join(5)
    assert got and got[0] - ended < 0.05, "handed over without a polling interval"
    assert not second.others_waiting()
    second.end_turn()


def test_a_writer_that_just_committed_queues_behind_one_already_waiting(tmp_path: Path) -> None:
    first, second = StoreLocks(tmp_path / "s"), StoreLocks(tmp_path / "s")
    order: list[str] = []
    assert first.take_turn(5)

    def other() -> None:
        assert second.take_turn(5)
        order.append("second")
        time.sleep(0.05)
        second.end_turn()

    waiter = in_thread(other)
    time.sleep(0.1)
    first.end_turn()
    assert first.take_turn(5)  # at once, as a busy writer does
    order.append("first again")
    first.end_turn()
    waiter.join(5)
    assert order == ["second", "first again"]


def test_a_writer_gives_up_on_a_turn_that_never_ends_and_the_late_turn_is_not_kept(tmp_path: Path) -> None:
    stuck, writer, third = (StoreLocks(tmp_path / "s") for _ in range(3))
    assert stuck.take_turn(5)
    started = time.monotonic()
    assert not writer.take_turn(0.3)
    assert 0.25 < time.monotonic() - started < 2
    stuck.end_turn()
    assert third.take_turn(5), "the turn the writer no longer wanted went back"
    third.end_turn()
    assert writer.take_turn(5)
    writer.end_turn()


def test_no_thread_to_wait_in_fails_that_write_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder, writer = StoreLocks(tmp_path / "s"), StoreLocks(tmp_path / "s")
    assert holder.take_turn(5)
    start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name == "store-turn":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(OSError, match="write turn"):
        writer.take_turn(1)
    holder.end_turn()
    assert writer.take_turn(1), "the turn is free: taken at once, without a helper"
    writer.end_turn()


def test_closing_while_a_wait_is_in_progress_lets_the_turn_go_when_the_wait_ends(tmp_path: Path) -> None:
    holder, leaving, third = (StoreLocks(tmp_path / "s") for _ in range(3))
    assert holder.take_turn(5)
    assert not leaving.take_turn(0.1), "its helper still waits"
    leaving.close()
    holder.end_turn()
    assert third.take_turn(5), "the closed store's late turn was given back"
    third.end_turn()


def test_a_lock_file_made_by_root_belongs_to_the_stores_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can create a file for another owner")
    store = tmp_path / "gatewayd.sqlite3"
    store.write_bytes(b"")
    os.chown(store, 65534, 65534)
    StoreLocks(store).close()
    made = lock_path(store).stat()
    assert (made.st_uid, made.st_gid) == (65534, 65534)


def test_only_one_worker_holds_a_store_and_a_dead_one_lets_go(tmp_path: Path) -> None:
    store = tmp_path / "gatewayd.sqlite3"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, pathlib; from gatewayd.store.locks import StoreLocks; "
         "assert StoreLocks(pathlib.Path(sys.argv[1])).hold_worker(); print('held', flush=True); "
         "time.sleep(60)", str(store)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        second = StoreLocks(store)
        assert not second.hold_worker()
        holder.kill()
        holder.wait()
        assert second.hold_worker()
        assert not StoreLocks(store).hold_worker()
        second.close()
        assert StoreLocks(store).hold_worker()
    finally:
        holder.kill()
        holder.wait()


async def test_a_background_batch_ends_early_when_another_stores_writer_waits(tmp_path: Path) -> None:
    """The worker's long batches of routing and delivery writes do not hold intake's commit back."""
    path = tmp_path / "gatewayd.sqlite3"
    worker, intake = await Store.open(path), await Store.open(path)
    events: list[str] = []
    try:
        async def slow_part(tx: Tx) -> None:
            time.sleep(0.002)
            events.append("background")

        async def job(tx: Tx) -> None:
            events.append("intake")

        background = [slow_part] * 100
        pending = asyncio.ensure_future(worker.transact_each(background))
        while "background" not in events:
            await asyncio.sleep(0.001)
        await intake.transact(job)
        assert events.index("intake") < 20, "intake's job waited for a few parts, not the batch of 100"
        assert all(result is None for result in await pending)
    finally:
        await worker.close()
        await intake.close()


HOLDER = """
import asyncio, os, signal, sys
from gatewayd.store import Store
async def main():
    store = await Store.open(sys.argv[1])
    async def job(tx):
        await tx.execute("INSERT INTO health (id, probed_at) VALUES (1, 0) "
                         "ON CONFLICT (id) DO UPDATE SET probed_at = 0")
        print("in transaction", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    await store.transact(job)
asyncio.run(main())
"""


async def test_a_writer_stopped_inside_its_transaction_fails_the_others_after_the_busy_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As SQLite's busy timeout did: intake answers 451 instead of never answering, and close() ends."""
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT", 0.5)
    path = tmp_path / "gatewayd.sqlite3"
    await (await Store.open(path)).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"in transaction\n"
        store = await Store.open(path)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="write turn"):
            await asyncio.wait_for(store.transact(lambda tx: tx.execute("SELECT 1")), 10)
        assert time.monotonic() - started < 5
        await asyncio.wait_for(store.close(), 5)
    finally:
        holder.kill()
        holder.wait()
