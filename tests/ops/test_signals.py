"""SIGTERM drains, SIGHUP reloads: against ``python -m gatewayd run`` as systemd would start it."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.ops.helpers import DaemonProcess, scrape, wait_until_refused
from tests.support.gateway import config_text, free_port
from tests.support.smtp import Client, Sink, message, send_message

pytestmark = pytest.mark.slow


def write(path: Path, text: str) -> None:
    """Replaces the config atomically, as an editor or a config manager should."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


async def start(tmp_path: Path, sink: Sink, **overrides: object) -> tuple[DaemonProcess, Path, dict[str, int]]:
    ports = {"smtp_port": free_port(), "lmtp_port": free_port(), "metrics_port": free_port()}
    path = tmp_path / "gatewayd.yaml"
    write(path, config_text(tmp_path, relay_port=sink.port, **ports, **overrides))  # type: ignore[arg-type]
    return await DaemonProcess.start(path, tmp_path), path, ports


async def open_transaction(port: int) -> Client:
    """A client that has sent MAIL, RCPT, DATA and the first half of its message."""
    client = await Client.connect(port)
    await client.greet()
    assert (await client.cmd("MAIL FROM:<carol@customer.test>")).code == 250
    assert (await client.cmd("RCPT TO:<support@example.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"From: carol@customer.test\r\nSubject: Drain\r\nMessage-ID: <drain@customer.test>\r\n"
                      b"\r\nfirst half\r\n")
    return client


async def test_sigterm_finishes_the_transaction_in_progress_then_exits_0(tmp_path: Path, sink: Sink) -> None:
    daemon, _, ports = await start(tmp_path, sink)
    busy = await open_transaction(ports["smtp_port"])
    idle = await Client.connect(ports["smtp_port"])
    await idle.greet()

    daemon.signal(signal.SIGTERM)
    await daemon.notify.wait_for("STOPPING=1")
    assert (await idle.reply()).code == 421, "an idle session is told to come back later"
    await wait_until_refused(ports["smtp_port"])
    assert daemon.process.returncode is None, "the daemon waits for the upload"

    await busy.send(b"second half\r\n.\r\n")
    reply = await busy.reply()
    assert (reply.code, reply.text) == (250, "2.0.0 Ok: queued as SUP-1000")
    await busy.close()
    await idle.close()
    assert await asyncio.wait_for(daemon.process.wait(), 20) == 0
    with sqlite3.connect(tmp_path / "gatewayd.sqlite3") as db:
        [(raw,)] = db.execute("SELECT raw FROM messages WHERE ticket = 1000").fetchall()
    assert raw.endswith(b"first half\r\nsecond half\r\n")
    assert "gatewayd stopped" in daemon.log_text()


async def test_a_transaction_that_outlasts_the_grace_period_is_cut_off_without_a_250(
        tmp_path: Path, sink: Sink) -> None:
    daemon, _, ports = await start(tmp_path, sink)
    stuck = await open_transaction(ports["smtp_port"])
    daemon.signal(signal.SIGTERM)
    started = asyncio.get_running_loop().time()
    assert (await stuck.reply(timeout=15)).code == 421
    assert await asyncio.wait_for(daemon.process.wait(), 20) == 0
    assert 4.5 < asyncio.get_running_loop().time() - started < 15, "shutdown_grace is 5s in the test config"
    with sqlite3.connect(tmp_path / "gatewayd.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    await stuck.close()


async def test_sighup_with_a_valid_config_changes_routing_without_dropping_connections(
        tmp_path: Path, sink: Sink) -> None:
    daemon, path, ports = await start(tmp_path, sink)
    try:
        [first] = await send_message(ports["smtp_port"], message("Before", message_id="<b@customer.test>"))
        assert first.code == 250
        assert (await sink.wait_for(1))[0].rcpt_tos == ["alice@agents.example.test"]
        kept = await Client.connect(ports["smtp_port"])
        await kept.greet()

        text = path.read_text()
        assert "  - {name: bob, address: bob@agents.example.test, teams: [support]}\n" in text
        write(path, text.replace("  - {name: bob, address: bob@agents.example.test, teams: [support]}\n", "")
              .replace("alice", "dave").replace("gw.example.test", "gw2.example.test"))
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_log("configuration reloaded")
        assert "changes to hostname take effect at the next restart" in daemon.log_text()
        await daemon.notify.wait_for("RELOADING=1")

        assert (await kept.cmd("MAIL FROM:<carol@customer.test>")).code == 250, "the open session survives"
        assert (await kept.cmd("RCPT TO:<support@example.test>")).code == 250
        [after] = await kept.data(message("After", message_id="<a@customer.test>"))
        assert after.code == 250
        await kept.close()
        assert (await sink.wait_for(2))[1].rcpt_tos == ["dave@agents.example.test"]
        metrics = await scrape(ports["metrics_port"])
        assert metrics.value("gatewayd_config_reloads_total", result="success") == 1
        assert metrics.value("gatewayd_tickets_open", team="support", agent="dave") == 1
    finally:
        assert await daemon.stop() == 0


@pytest.mark.parametrize(("breakage", "logged"), [
    (lambda text: text.replace("agents:", "agnets:"), "agnets"),
    (lambda text: text.replace("plugin: round_robin", "plugin: no_such_plugin"), "no_such_plugin"),
    (lambda text: text + "teams: [\n", "reload refused"),
], ids=["unknown key", "unknown plugin", "broken yaml"])
async def test_sighup_with_an_invalid_config_is_refused_and_the_old_one_keeps_serving(
        tmp_path: Path, sink: Sink, breakage: object, logged: str) -> None:
    daemon, path, ports = await start(tmp_path, sink)
    try:
        write(path, breakage(path.read_text()))  # type: ignore[operator]
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_log("reload refused, keeping the running configuration")
        refusal = next(line for line in daemon.log_text().splitlines() if "reload refused" in line)
        assert logged in refusal and "level=error" in refusal
        assert daemon.process.returncode is None

        [reply] = await send_message(ports["smtp_port"], message("Still here", message_id="<s@customer.test>"))
        assert reply.code == 250
        assert (await sink.wait_for(1))[0].rcpt_tos == ["alice@agents.example.test"]
        metrics = await scrape(ports["metrics_port"])
        assert metrics.value("gatewayd_config_reloads_total", result="failure") == 1
        assert metrics.value("gatewayd_config_reloads_total", result="success") == 0
    finally:
        assert await daemon.stop() == 0
