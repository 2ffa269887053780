"""The worker in a child process: routing and delivery on a core of their own.

One event loop is one core. With intake, routing and delivery on it, the SMTP
sessions got half of it under load while the machine's other core idled
(bench/RESULTS.md). So ``gatewayd run`` starts ``python -m
gatewayd.worker_process`` and runs :class:`~gatewayd.worker.Worker` there.
The two share the store file (WAL; writers take turns through
:class:`~gatewayd.store.locks.StoreLocks`) and one socket pair, on which the
daemon sends:

* ``start`` with its :class:`~gatewayd.config.Config`, once: the worker runs
  exactly the configuration the daemon validated, not whatever the file holds
  by the time it starts;
* ``wake`` after intake commits new work (at most one per loop turn);
* ``reconfigure`` after a reload the daemon accepted;
* ``samples``, asking for the worker's metric counts to add to its own;
* ``stop`` with the seconds left for deliveries in flight.

The worker answers ``ready`` and the samples. It ignores SIGTERM, SIGINT and
SIGHUP (systemd and a terminal signal the whole group): the daemon decides
when it stops, after the SMTP sessions have drained. When the daemon goes
away without a word (SIGKILL) the socket closes and the worker stops at once.
A worker that dies is started again by the daemon, after a pause that grows
while it keeps dying; nothing is lost meanwhile, because the work waits in
the store.
"""

from __future__ import annotations

import asyncio
import copyreg
import io
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from typing import TYPE_CHECKING

from .config import Config
from .discovery import RoutingChain, load_chain
from .errors import WorkerFailed
from .metrics import Metrics, Samples

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("gatewayd.worker")

START_TIMEOUT = 30.0  # well within systemd's TimeoutStartSec (60 s), so the daemon says why
SAMPLES_TIMEOUT = 2.0
# A stop waits this much longer than the grace for the worker to record its last results
# (systemd's TimeoutStopSec must exceed shutdown_grace by more than this).
STOP_MARGIN = 5.0
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A worker that ran this long before it died starts again after the shortest pause.
STABLE_AFTER = 60.0
_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024


def _mapping(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


def _reduce_mapping(mapping: MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return _mapping, (dict(mapping),)


class Channel:
    """Length-prefixed pickles over a stream socket between the daemon and its own worker.

    Pickle is safe here: both ends are the same program, connected by a
    socket pair nobody else holds. Config sections are read-only mappings,
    which pickle does not carry by itself.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def over(cls, sock: socket.socket) -> "Channel":
        reader, writer = await asyncio.open_connection(sock=sock, limit=_MAX_FRAME)
        return cls(reader, writer)

    def send(self, *message: Any) -> None:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = {**copyreg.dispatch_table, MappingProxyType: _reduce_mapping}
        pickler.dump(message)
        frame = buffer.getvalue()
        self._writer.write(_HEADER.pack(len(frame)) + frame)

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or None once the other end has closed."""
        try:
            header = await self._reader.readexactly(_HEADER.size)
            (size,) = _HEADER.unpack(header)
            if size > _MAX_FRAME:
                raise ConnectionError(f"a worker channel frame of {size} bytes")
            message = pickle.loads(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return tuple(message)

    def close(self) -> None:
        self._writer.close()


class WorkerProcess:
    """The daemon's side: starts the worker process, talks to it, starts it again when it dies."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._config: Config | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._channel: Channel | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._answers: dict[int, asyncio.Future[Samples]] = {}
        # The counts of this worker at its last report, and of the workers before it: a
        # restart must not make the daemon's counters go down.
        self._reported: Samples = {}
        self._retired: Samples = {}
        self._requests = 0
        self._wake_pending = False

    async def start(self, config: Config) -> None:
        """Starts the worker and waits until it runs; raises :class:`WorkerFailed` when it cannot start."""
        self._config = config
        await self._spawn()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="worker-supervisor")

    def wake(self) -> None:
        if self._wake_pending:
            return
        self._wake_pending = True
        asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_pending = False
        self._send("wake")

    def reconfigure(self, config: Config, chain: RoutingChain) -> None:
        """Hands a reloaded config over; the worker loads its own routing chain from it."""
        self._config = config
        self._send("reconfigure", config)

    async def samples(self) -> Samples:
        """The worker's metric counts, those of earlier (restarted) workers included.

        While it is down or slow to answer, its last report stands in, so the
        scrape goes on and no counter goes down.
        """
        channel = self._channel
        if channel is not None:
            self._requests += 1
            request = self._requests
            answer = self._answers[request] = asyncio.get_running_loop().create_future()
            channel.send("samples", request)
            try:
                report = await asyncio.wait_for(answer, SAMPLES_TIMEOUT)
            except (TimeoutError, ConnectionError):
                log.warning("the worker process did not report its metrics in time; its last report stands in")
            else:
                if self._channel is channel:  # not a worker that died meanwhile: its counts are retired
                    self._reported = report
            finally:
                self._answers.pop(request, None)
        return _added(self._retired, self._reported)

    async def stop(self, grace: float) -> None:
        """Lets the worker finish deliveries in flight within ``grace`` seconds, then waits for it to exit."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        process = self._process
        if process is None or process.returncode is not None:
            self._disconnect()
            return
        self._send("stop", grace)
        try:
            await asyncio.wait_for(process.wait(), grace + STOP_MARGIN)
        except TimeoutError:
            log.error("the worker process (pid %d) did not stop within %.0fs; killing it", process.pid,
                      grace + STOP_MARGIN)
            process.kill()
            await process.wait()
        self._disconnect()

    # ------------------------------------------------------------------ the process

    async def _spawn(self) -> None:
        assert self._config is not None
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                # -P: nothing from the working directory (the store's) shadows gatewayd's modules.
                sys.executable, "-P", "-m", "gatewayd.worker_process", str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL, env=_environment())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            self._channel = channel = await Channel.over(ours)
        except BaseException:
            ours.close()
            await self._end_process()
            raise
        try:
            channel.send("start", self._config)
            ready = await asyncio.wait_for(channel.receive(), START_TIMEOUT)
        except TimeoutError:
            ready = None
        except BaseException:
            await self._end_process()
            raise
        if ready != ("ready",):
            await self._end_process()
            raise WorkerFailed("the worker process (routing and delivery) did not start; its log lines above "
                               "say why")
        self._reader = asyncio.get_running_loop().create_task(self._read(channel), name="worker-channel")
        log.info("worker process started pid=%d", self._process.pid)

    async def _read(self, channel: Channel) -> None:
        while (message := await channel.receive()) is not None:
            if message[0] == "samples":
                answer = self._answers.get(message[1])
                if answer is not None and not answer.done():
                    answer.set_result(message[2])

    async def _supervise(self) -> None:
        """Starts the worker again whenever it exits unasked, after a pause that grows while it keeps dying."""
        failures = 0
        while True:
            assert self._process is not None
            started = time.monotonic()
            status = await self._process.wait()
            self._disconnect()
            self._retired, self._reported = _added(self._retired, self._reported), {}
            failures = 1 if time.monotonic() - started >= STABLE_AFTER else failures + 1
            self._metrics.worker_restarted()
            log.error("the worker process exited with status %s; routing and delivery wait in the store until "
                      "it is started again", status)
            while True:
                await asyncio.sleep(RESTART_DELAYS[min(failures, len(RESTART_DELAYS)) - 1])
                try:
                    await self._spawn()
                    break
                except WorkerFailed as exc:
                    log.error("%s", exc)
                except Exception:
                    log.exception("the worker process could not be started again")
                failures += 1

    async def _end_process(self) -> None:
        self._disconnect()
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()

    def _disconnect(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(ConnectionError("the worker process went away"))

    def _send(self, *message: Any) -> None:
        if self._channel is not None:
            self._channel.send(*message)


def _added(first: Samples, second: Samples) -> Samples:
    total = dict(first)
    for key, value in second.items():
        total[key] = total.get(key, 0.0) + value
    return total


def _environment() -> dict[str, str]:
    """The daemon's environment, minus systemd's notify socket (only the daemon speaks to systemd), and with
    this gatewayd first on the path, whichever way the daemon was started."""
    env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
    return env


# ---------------------------------------------------------------------- the worker's side


async def _serve(fd: int) -> int:
    from . import logs
    from .store import Store
    from .store.locks import StoreLocks
    from .worker import Worker

    channel = await Channel.over(socket.socket(fileno=fd))
    first = await channel.receive()
    if first is None or first[0] != "start":
        return 2
    config: Config = first[1]
    logs.configure(config.logging)
    locks = StoreLocks(config.store.path)
    try:
        await _hold_worker(locks)
        store = await Store.open(config.store.path, inline_reads=True, checkpoints="elsewhere")
        try:
            metrics = Metrics()
            metrics.watch_store(lambda: store.stats)
            worker = Worker(config, store, metrics, load_chain(config, metrics))
            worker.start()
            channel.send("ready")
            grace = await _obey(channel, worker, metrics)
            await worker.stop(grace)
        finally:
            await store.close()
    except Exception:
        log.exception("the worker process failed")
        return 1
    finally:
        locks.close()
    return 0


async def _hold_worker(locks: StoreLocks) -> None:
    """Waits until no other worker runs on this store (one still finishing after a restart)."""
    if locks.hold_worker():
        return
    log.warning("another worker process is still running on %s; waiting for it to finish", locks.path)
    while not locks.hold_worker():
        await asyncio.sleep(0.1)


async def _obey(channel: Channel, worker: Worker, metrics: Metrics) -> float:
    """Serves the daemon's messages until it says stop (its grace) or goes away (no grace)."""
    while True:
        message = await channel.receive()
        if message is None:
            log.warning("the daemon went away; the worker stops now (what is not done waits in the store)")
            return 0.0
        kind = message[0]
        if kind == "wake":
            worker.wake()
        elif kind == "samples":
            channel.send("samples", message[1], metrics.samples())
        elif kind == "reconfigure":
            try:
                chain = load_chain(message[1], metrics)
            except Exception:
                log.exception("the worker could not load the reloaded routing chain; it keeps the running one")
            else:
                worker.reconfigure(message[1], chain)
        elif kind == "stop":
            return float(message[1])


def main(argv: list[str]) -> int:
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    return asyncio.run(_serve(int(argv[1])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
