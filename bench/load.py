"""Load generators: Postfix's smtp-source for throughput, an asyncio client for time-to-250."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Throughput:
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def smtp_source(port: int, size: int, sessions: int, count: int, timeout: float) -> Throughput:
    """Sends ``count`` messages of ``size`` payload bytes over ``sessions`` parallel sessions."""
    command = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size), "-M", "client.test",
               "-f", "carol@customer.test", "-t", "support@example.test", "-S", "Benchmark", f"127.0.0.1:{port}"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {done.stderr.strip()[:300]}")
    return Throughput(count, seconds)


def _message(size: int, worker: int, sequence: int) -> bytes:
    head = (f"From: carol@customer.test\r\nTo: support@example.test\r\nSubject: latency {worker}/{sequence}\r\n"
            f"Message-ID: <lat.{os.getpid()}.{worker}.{sequence}.{time.time_ns()}@customer.test>\r\n\r\n").encode()
    line = b"X" * 76 + b"\r\n"
    return head + line * max(1, size // len(line))


async def _worker(port: int, size: int, worker: int, count: int, samples: list[float],
                  pace: tuple[float, float, float] | None = None) -> None:
    """One session sending ``count`` messages; with ``pace`` (start, offset, interval) message n is due
    at start + offset + n * interval, else they follow each other at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO client.test\r\n")
    await reply()
    for sequence in range(count):
        if pace is not None:
            await asyncio.sleep(max(0.0, pace[0] + pace[1] + sequence * pace[2] - time.monotonic()))
        writer.write(b"MAIL FROM:<carol@customer.test>\r\nRCPT TO:<support@example.test>\r\nDATA\r\n")
        for _ in range(3):
            await reply()
        writer.write(_message(size, worker, sequence))
        await writer.drain()
        started = time.perf_counter()
        writer.write(b".\r\n")
        answer = await reply()
        samples.append(time.perf_counter() - started)
        if not answer.startswith(b"250"):
            raise RuntimeError(f"not accepted: {answer!r}")
    writer.write(b"QUIT\r\n")
    writer.close()


def time_to_250(port: int, size: int, sessions: int, count: int, timeout: float) -> list[float]:
    """Seconds from the final ``.`` to the ``250``, one sample per message, ``count`` in all."""
    samples: list[float] = []
    per_worker = max(1, count // sessions)

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(_worker(port, size, w, per_worker, samples)
                                                for w in range(sessions))), timeout)
    asyncio.run(run())
    return samples


def paced(port: int, size: int, count: int, rate: float, timeout: float) -> None:
    """One session sending ``count`` messages at ``rate`` per second: end to end without a backlog."""
    async def run() -> None:
        for sequence in range(count):
            started = time.monotonic()
            await _worker(port, size, 1000 + sequence, 1, [])
            await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - started)))
    asyncio.run(asyncio.wait_for(run(), timeout))


def paced_sessions(port: int, size: int, sessions: int, count: int, rate: float, timeout: float) -> Throughput:
    """``count`` messages over ``sessions`` sessions, started at ``rate`` per second in all (open loop).

    Each session sends its share on a schedule; one that falls behind sends its
    next message at once. Unlike smtp-source's closed loop, the load does not
    grow with the server's speed: below the server's limit, end-to-end times
    show its pipeline instead of the backlog of a burst.
    """
    async def session(worker: int) -> None:
        await _worker(port, size, worker, count // sessions, [], pace=(started, worker / rate, sessions / rate))

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(session(w) for w in range(sessions))), timeout)
    started = time.monotonic()
    asyncio.run(run())
    return Throughput(count // sessions * sessions, time.monotonic() - started)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def idle_connections(port: int, count: int, timeout: float) -> list[object]:
    """Opens ``count`` sessions that read the banner and then sit idle; returns the sockets."""
    import socket
    held = []
    deadline = time.monotonic() + timeout
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=max(0.1, deadline - time.monotonic()))
        banner = sock.recv(512)
        if not banner.startswith(b"220"):
            raise RuntimeError(f"session refused: {banner!r}")
        held.append(sock)
    return held
