"""``gatewayd store backup PATH``: a consistent, verified copy while the daemon takes mail."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gatewayd.cli import main
from gatewayd.store import Store
from gatewayd.store.schema import LATEST
from tests.conftest import Gateway
from tests.support.gateway import REPO, write_config
from tests.support.smtp import message, send_message


async def keep_sending(port: int, stop: asyncio.Event, accepted: list[str]) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        [reply] = await send_message(port, message(f"Load {n}", message_id=f"<load{n}@customer.test>"))
        assert reply.code == 250
        accepted.append(reply.text.rsplit(" ", 1)[1])


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", *args, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_backup_while_mail_arrives_is_consistent_and_opens_as_a_store(
        gateway_factory: Callable[..., Any], tmp_path: Path) -> None:
    gw: Gateway = await gateway_factory()
    stop, accepted = asyncio.Event(), []
    sender = asyncio.create_task(keep_sending(gw.smtp_port, stop, accepted))
    while len(accepted) < 5:
        await asyncio.sleep(0.02)
    copy = tmp_path / "backups" / "gatewayd-copy.sqlite3"
    copy.parent.mkdir()
    code, out, err = await cli("store", "backup", str(copy), "-c", str(gw.config_path))
    during = len(accepted)
    stop.set()
    await sender
    assert code == 0, err
    assert "integrity ok" in out and len(accepted) > 5, "the daemon kept accepting mail"

    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",), "one self-contained file"
        assert db.execute("PRAGMA user_version").fetchone() == (LATEST,)
        tickets = db.execute("SELECT count(*) FROM tickets").fetchone()[0]
        orphans = db.execute("SELECT count(*) FROM work w LEFT JOIN messages m ON m.id = w.message "
                             "WHERE m.id IS NULL").fetchone()[0]
    assert 5 <= tickets <= during + 1 and orphans == 0
    assert sorted(p.name for p in copy.parent.iterdir()) == ["gatewayd-copy.sqlite3"], "no partial files left"

    restored = await Store.open(copy, check=True)
    try:
        assert len(await restored.tickets()) == tickets
        first = await restored.ticket(1000)
        assert first is not None and first.subject == "Load 1"
    finally:
        await restored.close()


def test_an_existing_target_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, config = write_config(tmp_path, smtp_port=1, lmtp_port=2, relay_port=3)
    asyncio.run(_create_store(config.store.path))
    target = tmp_path / "existing"
    target.write_bytes(b"precious")
    assert main(["store", "backup", str(target), "-c", str(path)]) == 1
    assert target.read_bytes() == b"precious"
    assert "refusing to overwrite" in capsys.readouterr().err


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, config = write_config(tmp_path, smtp_port=1, lmtp_port=2, relay_port=3)
    assert main(["store", "backup", str(tmp_path / "copy"), "-c", str(path)]) == 1
    assert not config.store.path.exists() and not (tmp_path / "copy").exists()
    assert "no such store" in capsys.readouterr().err


def test_a_foreign_sqlite_file_is_not_backed_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, config = write_config(tmp_path, smtp_port=1, lmtp_port=2, relay_port=3)
    with sqlite3.connect(config.store.path) as db:
        db.execute("CREATE TABLE notes (x)")
    assert main(["store", "backup", str(tmp_path / "copy"), "-c", str(path)]) == 1
    assert "not a gatewayd store" in capsys.readouterr().err
    assert not (tmp_path / "copy").exists()


async def _create_store(path: Path) -> None:
    store = await Store.open(path)
    await store.close()
