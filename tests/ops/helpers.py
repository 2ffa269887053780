"""Test-side tools for the operations specs: an HTTP GET, a Prometheus scrape, a daemon subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import REPO
from tests.support.smtp import Client


async def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@dataclass(frozen=True)
class Scrape:
    """One scrape of ``/metrics``: families by name, and sample values by (name, labels)."""

    families: dict[str, Metric]
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; a missing series is an error, not zero."""
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            raise AssertionError(f"no series {name}{labels} in the scrape")
        return self.samples[key]

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, l), v in self.samples.items() if n == name and wanted <= l)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {l: v for (n, l), v in self.samples.items() if n == name}

    def names(self) -> set[str]:
        """Every exported metric name, as written in PromQL (histogram and counter suffixes kept)."""
        return {n for n, _ in self.samples}


async def scrape(port: int) -> Scrape:
    status, body = await http_get(port, "/metrics")
    assert status == 200, (status, body[:200])
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    return Scrape(families, samples)


def base_name(name: str) -> str:
    """A histogram's or counter's sample name reduced to what it is referenced by."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class NotifySocket:
    """A stand-in for systemd's notification socket: collects what sd_notify sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[str] = []

    async def wait_for(self, field: str, timeout: float = 20) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(field in message.split("\n") for message in self.received):
            if loop.time() > deadline:
                raise AssertionError(f"no {field} from the daemon; got {self.received}")
            try:
                self.received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                await asyncio.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


@dataclass
class DaemonProcess:
    """``python -m gatewayd run`` as systemd would run it: NOTIFY_SOCKET set, stderr to a log file."""

    process: asyncio.subprocess.Process
    notify: NotifySocket
    log: Path

    @classmethod
    async def start(cls, config: Path, tmp: Path, *, name: str = "daemon") -> DaemonProcess:
        notify = NotifySocket(tmp / f"{name}.notify")
        log = tmp / f"{name}.log"
        env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "PYTHONPATH": str(REPO)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gatewayd", "run", "-c", str(config), cwd=str(tmp), env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log.open("wb"))
        daemon = cls(process, notify, log)
        try:
            await notify.wait_for("READY=1")
        except AssertionError:
            await daemon.kill()
            raise AssertionError(f"gatewayd did not become ready:\n{log.read_text()}") from None
        return daemon

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def wait_for_log(self, text: str, timeout: float = 10) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while text not in self.log_text():
            assert loop.time() < deadline, f"{text!r} never appeared in the log:\n{self.log_text()}"
            await asyncio.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def stop(self, timeout: float = 30) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        self.notify.close()
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.notify.close()


async def wait_until_refused(port: int, timeout: float = 10) -> None:
    """Waits until nothing listens on ``port`` any more."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            client = await Client.connect(port)
        except OSError:
            return
        await client.close()
        assert loop.time() < deadline, f"port {port} still accepts connections"
        await asyncio.sleep(0.05)
