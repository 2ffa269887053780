"""The daemon's side of the worker: what crosses the socket pair, and counts that survive the worker."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from gatewayd import config as config_module
from gatewayd.daemon import Daemon
from gatewayd.errors import WorkerFailed
from gatewayd.metrics import Metrics, Samples
from gatewayd.store.locks import StoreLocks
from gatewayd.worker_process import Channel, WorkerProcess
from tests.support.gateway import config_text, free_port

SENT = ("gatewayd_delivery_attempts_total", (("kind", "forward"), ("result", "sent")))


def a_config(tmp_path: Path) -> config_module.Config:
    text = config_text(tmp_path, smtp_port=free_port(), lmtp_port=free_port(), relay_port=free_port())
    return config_module.loads(text + "sla: {teams: {support: {first_response: 4h}}}\n",
                               source=tmp_path / "gatewayd.yaml")


async def test_the_worker_receives_the_daemons_config_whole(tmp_path: Path) -> None:
    config = a_config(tmp_path)
    assert config.sla.teams, "a config with read-only mappings in it"
    ours, theirs = socket.socketpair()
    sender, receiver = await Channel.over(ours), await Channel.over(theirs)
    sender.send("start", config)
    kind, received = await receiver.receive()  # type: ignore[misc]
    assert kind == "start" and received.sla == config.sla and received.agents == config.agents
    sender.close()
    assert await receiver.receive() is None, "a closed channel reads as the end, not an error"
    receiver.close()


class _Exited:
    """A worker process that has answered and is about to be reported dead."""

    pid = 4242

    def __init__(self) -> None:
        self.returncode: int | None = None
        self._done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await self._done

    def exit(self, status: int) -> None:
        self.returncode = status
        self._done.set_result(status)


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[object, ...]] = []

    def send(self, *message: object) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


async def answer_next_request(worker: WorkerProcess, channel: _Recorder, report: Samples) -> None:
    await asyncio.sleep(0)
    request = next(m[1] for m in reversed(channel.sent) if m[0] == "samples")
    worker._answers[request].set_result(report)  # type: ignore[index]


async def test_a_worker_dying_right_after_its_report_is_counted_once_and_counters_never_go_down() -> None:
    worker = WorkerProcess(Metrics())
    process, channel = _Exited(), _Recorder()
    worker._process, worker._channel = process, channel  # type: ignore[assignment]
    worker._reported = {SENT: 5.0}

    async def no_restart() -> None:
        await asyncio.sleep(3600)

    worker._spawn = no_restart  # type: ignore[method-assign]
    worker._supervisor = asyncio.ensure_future(worker._supervise())
    try:
        scrape = asyncio.ensure_future(worker.samples())
        await answer_next_request(worker, channel, {SENT: 10.0})
        process.exit(-9)  # reported in the same loop turn as the answer
        first = (await scrape)[SENT]

        successor = _Recorder()
        worker._channel = successor  # type: ignore[assignment]
        scrape = asyncio.ensure_future(worker.samples())
        await answer_next_request(worker, successor, {SENT: 1.0})
        second = (await scrape)[SENT]
        assert first == 5.0, "the dead worker's counts come in once, from its last report"
        assert second == 6.0 and second >= first
    finally:
        worker._supervisor.cancel()
        await asyncio.gather(worker._supervisor, return_exceptions=True)


async def test_one_process_mode_refuses_a_store_whose_worker_runs_elsewhere(tmp_path: Path) -> None:
    config = a_config(tmp_path)
    running = StoreLocks(config.store.path)
    assert running.hold_worker()
    daemon = Daemon(config)
    try:
        with pytest.raises(WorkerFailed, match="deliver the same mail twice"):
            await daemon.start()
    finally:
        await daemon.shutdown()
        running.close()
    started = Daemon(config)
    await started.start()
    await started.shutdown()
