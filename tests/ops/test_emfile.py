"""Out of file descriptors: the accept loop logs, backs off and carries on; the daemon survives."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import pytest

from tests.ops.helpers import DaemonProcess
from tests.support.gateway import config_text, free_port
from tests.support.smtp import Client, Sink, message, send_message

pytestmark = pytest.mark.slow

FD_LIMIT = 64


async def test_accept_survives_emfile(tmp_path: Path, sink: Sink) -> None:
    smtp_port = free_port()
    path = tmp_path / "gatewayd.yaml"
    path.write_text(config_text(tmp_path, smtp_port=smtp_port, lmtp_port=free_port(), relay_port=sink.port))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))
    try:
        daemon = await DaemonProcess.start(path, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        flood = []
        for _ in range(FD_LIMIT + 16):
            flood.append(await Client.connect(smtp_port))
        await daemon.wait_for_log("out of system resource")
        assert daemon.process.returncode is None
        for client in flood:
            client.writer.close()
        await asyncio.sleep(1.5)
        [reply] = await asyncio.wait_for(send_message(smtp_port, message("After the flood")), 15)
        assert reply.code == 250
    finally:
        assert await daemon.stop() == 0
