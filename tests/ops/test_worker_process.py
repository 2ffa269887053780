"""``gatewayd run`` routes and delivers in a worker process: started, supervised, stopped and measured with the daemon."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from gatewayd import config as config_module
from gatewayd.errors import WorkerFailed
from gatewayd.metrics import Metrics
from gatewayd.worker_process import WorkerProcess
from tests.ops.helpers import DaemonProcess, scrape
from tests.support.gateway import config_text, free_port
from tests.support.smtp import Sink, message, send_message

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def wait_until(condition, timeout: float = 15, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def start(tmp_path: Path, sink: Sink) -> tuple[DaemonProcess, dict[str, int]]:
    ports = {"smtp_port": free_port(), "lmtp_port": free_port(), "metrics_port": free_port()}
    path = tmp_path / "gatewayd.yaml"
    path.write_text(config_text(tmp_path, relay_port=sink.port, **ports))
    return await DaemonProcess.start(path, tmp_path), ports


def the_worker(daemon: DaemonProcess) -> int:
    [worker] = children(daemon.process.pid)
    assert "gatewayd.worker_process" in command_line(worker)
    return worker


async def test_routing_and_delivery_run_in_a_worker_process_that_stops_with_the_daemon(
        tmp_path: Path, sink: Sink) -> None:
    daemon, ports = await start(tmp_path, sink)
    worker = the_worker(daemon)
    [reply] = await send_message(ports["smtp_port"], message("Two processes", message_id="<w1@customer.test>"))
    assert reply.code == 250
    assert (await sink.wait_for(1))[0].rcpt_tos == ["alice@agents.example.test"]
    assert "NOTIFY_SOCKET" not in Path(f"/proc/{worker}/environ").read_bytes().decode(errors="replace"), \
        "only the daemon speaks to systemd"

    os.kill(worker, signal.SIGTERM)
    os.kill(worker, signal.SIGHUP)
    await asyncio.sleep(0.3)
    assert alive(worker), "systemd and a terminal signal the whole group; the daemon decides when the worker stops"

    assert await daemon.stop() == 0
    assert not alive(worker)


async def test_one_scrape_counts_what_both_processes_did(tmp_path: Path, sink: Sink) -> None:
    daemon, ports = await start(tmp_path, sink)
    try:
        for number in range(3):
            [reply] = await send_message(ports["smtp_port"],
                                         message(f"Counted {number}", message_id=f"<c{number}@customer.test>"))
            assert reply.code == 250
        await sink.wait_for(3)
        await asyncio.sleep(0.3)  # the delivery results are recorded after the relay's 250
        metrics = await scrape(ports["metrics_port"])
        assert metrics.value("gatewayd_messages_received_total", listener="smtp", outcome="accepted") == 3
        assert metrics.total("gatewayd_routing_decisions_total") == 3, "counted in the worker"
        assert metrics.value("gatewayd_delivery_attempts_total", kind="forward", result="sent") == 3
        assert metrics.value("gatewayd_tickets_created_total", team="support") == 3
        assert metrics.value("gatewayd_tickets_open", team="support", agent="alice") + \
            metrics.value("gatewayd_tickets_open", team="support", agent="bob") == 3, "gauges are not doubled"
        assert metrics.value("gatewayd_build_info", version=next(iter(
            dict(labels)["version"] for labels in metrics.series("gatewayd_build_info")))) == 1
        writes = metrics.value("gatewayd_store_writes_total")
        assert writes >= 3 + 3 + 3, "intake, routing and delivery results, from both processes"
        assert 0 < metrics.value("gatewayd_store_commits_total") <= writes
        assert metrics.value("gatewayd_worker_restarts_total") == 0
    finally:
        assert await daemon.stop() == 0


async def test_a_worker_that_dies_is_started_again_and_delivers_what_arrived_meanwhile(
        tmp_path: Path, sink: Sink) -> None:
    daemon, ports = await start(tmp_path, sink)
    try:
        [reply] = await send_message(ports["smtp_port"], message("Before", message_id="<b@customer.test>"))
        assert reply.code == 250
        await sink.wait_for(1)
        await asyncio.sleep(0.3)
        sent = {"kind": "forward", "result": "sent"}
        assert (await scrape(ports["metrics_port"])).value("gatewayd_delivery_attempts_total", **sent) == 1

        first = the_worker(daemon)
        os.kill(first, signal.SIGKILL)
        await daemon.wait_for_log("the worker process exited with status -9")
        [reply] = await send_message(ports["smtp_port"], message("While down", message_id="<d@customer.test>"))
        assert reply.code == 250, "intake does not depend on the worker"

        assert (await sink.wait_for(2, timeout=20))[1].rcpt_tos[0].endswith("@agents.example.test")
        second = the_worker(daemon)
        assert second != first
        await asyncio.sleep(0.3)
        metrics = await scrape(ports["metrics_port"])
        assert metrics.value("gatewayd_worker_restarts_total") == 1
        assert metrics.value("gatewayd_delivery_attempts_total", **sent) == 2, \
            "the dead worker's counts stay: a restart never makes a counter go down"
    finally:
        assert await daemon.stop() == 0


async def test_the_worker_stops_when_the_daemon_is_killed(tmp_path: Path, sink: Sink) -> None:
    daemon, _ = await start(tmp_path, sink)
    worker = the_worker(daemon)
    await daemon.kill()
    await wait_until(lambda: not alive(worker), what="the orphaned worker to exit")


async def test_a_worker_that_cannot_start_is_reported_not_waited_for(tmp_path: Path, sink: Sink) -> None:
    (tmp_path / "gatewayd.sqlite3").mkdir()  # the worker cannot open a directory as its store
    config = config_module.loads(config_text(tmp_path, smtp_port=free_port(), lmtp_port=free_port(),
                                             relay_port=sink.port), source=tmp_path / "gatewayd.yaml")
    worker = WorkerProcess(Metrics())
    with pytest.raises(WorkerFailed, match="did not start"):
        await asyncio.wait_for(worker.start(config), 30)
    await worker.stop(0)
