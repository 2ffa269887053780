"""The daemon: owns the one event loop's long-running parts and their order of start and stop.

Start: store (checked, migrated) → worker (its own process under ``gatewayd
run``) → listeners → metrics endpoint → ``READY=1`` to systemd.
SIGTERM: ``STOPPING=1``, stop accepting, answer idle sessions ``421`` and let
transactions in progress (from ``MAIL`` to the reply after DATA) finish within
``shutdown_grace``, stop the worker with what is left of it, close the store,
exit 0. Nothing that got a ``250`` is lost, because it was committed before
the ``250``.
SIGHUP: reload agents, teams and routing, here and in the worker; an invalid
file is refused with a log line and the running configuration stays.
Connections are never dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP

from . import config as config_module
from . import sdnotify
from .config import Config
from .discovery import load_chain
from .errors import ConfigError, WorkerFailed
from .http import serve
from .ids import TicketIds
from .intake import Intake
from .listener import ListenerStats, SessionHandler, protocol_factory, start_server
from .metrics import CONTENT_TYPE, Known, Metrics
from .outbox import Outbox
from .router import Router
from .sla import SlaClock
from .store import Store
from .store.locks import StoreLocks
from .worker import Worker
from .worker_process import WorkerProcess

log = logging.getLogger("gatewayd.daemon")

# /healthz must answer before a load balancer or systemd gives up on it; the
# store's own busy timeout (10 s) is far longer than that.
HEALTH_TIMEOUT = 2.0
_DRAIN_POLL = 0.05
# Read once at start by the listeners, intake, outbox and store: a reload cannot change them.
_RESTART_KEYS = ("hostname", "listeners", "store", "support", "tickets", "relay", "metrics", "limits", "logging",
                 "dns")


@dataclass
class _Running:
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    stats: dict[str, ListenerStats] = field(default_factory=dict)


class Sessions:
    """The live SMTP/LMTP sessions of every listener, so a drain can tell idle ones from busy ones.

    A session is busy from ``MAIL`` until the reply to its DATA: aiosmtpd keeps
    the envelope's sender exactly that long. ``in_data`` alone would miss a
    client still uploading its message.
    """

    def __init__(self) -> None:
        self._live: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def track(self, factory: Callable[[], SMTP]) -> Callable[[], SMTP]:
        def build() -> SMTP:
            protocol = factory()
            self._live.add(protocol)
            return protocol
        return build

    def _connected(self) -> list[SMTP]:
        return [p for p in self._live if p.transport is not None and not p.transport.is_closing()]

    def busy(self) -> int:
        return sum(1 for p in self._connected() if p.envelope is not None and p.envelope.mail_from)

    def close(self, reply: str, *, idle_only: bool) -> int:
        """Answers ``reply`` and closes each (idle) session; returns how many were closed."""
        closed = 0
        for protocol in self._connected():
            if idle_only and protocol.envelope is not None and protocol.envelope.mail_from:
                continue
            assert protocol.transport is not None
            protocol.transport.write(reply.encode("ascii") + b"\r\n")
            protocol.transport.close()
            closed += 1
        return closed


class Daemon:
    """Listeners, intake and the metrics endpoint; routing and delivery run in :class:`Worker`.

    ``worker_process`` runs the worker in a child process (``gatewayd run``);
    without it, on this loop (tests, ``--one-process``).
    """

    def __init__(self, config: Config, *, worker_process: bool = False) -> None:
        self.config = config
        self._worker_process = worker_process
        self.metrics = Metrics()
        self._chain = load_chain(config, self.metrics)
        self._stop = asyncio.Event()
        self._shut_down = False
        self._running = _Running()
        self._sessions = Sessions()
        self.store: Store | None = None
        self.worker: Worker | WorkerProcess | None = None
        self._worker_lock: StoreLocks | None = None
        self._intake: Intake | None = None

    def _inline(self) -> Worker:
        if not isinstance(self.worker, Worker):
            raise RuntimeError("routing and delivery run in the worker process")
        return self.worker

    @property
    def router(self) -> Router:
        return self._inline().router

    @property
    def outbox(self) -> Outbox:
        return self._inline().outbox

    @property
    def sla(self) -> SlaClock:
        return self._inline().sla

    async def start(self) -> None:
        config = self.config
        self.store = await Store.open(config.store.path, check=True, checkpoints="background")
        store = self.store
        self.metrics.watch_store(lambda: store.stats)
        ids = TicketIds(config.tickets.prefix, config.hostname, config.support.reply_secret.encode())
        if self._worker_process:
            worker: Worker | WorkerProcess = WorkerProcess(self.metrics)
            await worker.start(config)
        else:
            self._worker_lock = StoreLocks(config.store.path)
            if not self._worker_lock.hold_worker():
                raise WorkerFailed(f"another gatewayd's worker runs on {config.store.path} (it holds "
                                   f"{self._worker_lock.path}); two would deliver the same mail twice")
            worker = Worker(config, self.store, self.metrics, self._chain)
            worker.start()
        self.worker = worker
        intake = self._intake = Intake(config, self.store, ids, on_committed=worker.wake)
        self._prime(config)
        for listener in config.listeners:
            stats = ListenerStats()
            self._running.stats[listener.name] = stats
            handler = SessionHandler(listener, config, intake, stats, observe=self.metrics.transaction)
            factory = self._sessions.track(protocol_factory(listener, config, handler, stats))
            server = await start_server(listener, factory)
            self._running.servers.append(server)
            log.info("listening protocol=%s address=%s name=%s", listener.protocol, listener.address, listener.name)
        if config.metrics.address is not None:
            endpoint = config.metrics.address
            server = await serve(endpoint.host or "127.0.0.1", endpoint.port or 9464,
                                 {"/metrics": self._metrics, "/healthz": self._healthz})
            self._running.servers.append(server)
            log.info("metrics endpoint address=%s", endpoint)

    def _prime(self, config: Config) -> None:
        self.metrics.prime(Known(
            listeners=tuple(l.name for l in config.listeners), teams=tuple(t.name for t in config.teams),
            pairs=tuple((team, a.name) for a in config.agents for team in a.teams),
            plugins=tuple(link.name for link in self._chain.links)))

    async def _metrics(self) -> tuple[int, str, bytes]:
        assert self.store is not None
        await self.metrics.refresh(self.store, {n: s.active for n, s in self._running.stats.items()})
        if isinstance(self.worker, WorkerProcess):
            return 200, CONTENT_TYPE, self.metrics.exposition(await self.worker.samples())
        return 200, CONTENT_TYPE, self.metrics.exposition()

    async def _healthz(self) -> tuple[int, str, bytes]:
        """200 only while every listener is up and a write transaction commits within HEALTH_TIMEOUT."""
        assert self.store is not None
        if self._shut_down or not all(server.is_serving() for server in self._running.servers):
            return 503, "text/plain", b"listeners down\n"
        try:
            writable = await asyncio.wait_for(self.store.writable(), HEALTH_TIMEOUT)
        except TimeoutError:
            writable = False
        if not writable:
            return 503, "text/plain", b"store not writable\n"
        return 200, "text/plain", b"ok\n"

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> bool:
        """Re-reads the config file; agents, teams and routing take effect for the next message.

        Returns whether the new file was taken. A refused file changes nothing.
        """
        sdnotify.notify(sdnotify.RELOADING, "STATUS=reloading configuration")
        try:
            new = config_module.load(self.config.source)
            chain = load_chain(new, self.metrics)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", "; ".join(map(str, exc.issues)))
            return self._reloaded(False)
        except Exception:
            log.exception("reload refused, keeping the running configuration: the routing chain failed to load")
            return self._reloaded(False)
        pending = [key for key in _RESTART_KEYS if getattr(new, key) != getattr(self.config, key)]
        if pending:
            log.warning("reload: changes to %s take effect at the next restart; the rest is applied now",
                        ", ".join(pending))
            # Every part must keep seeing the running values of these sections, or
            # e.g. intake (old secret) and the reply path (new secret) would disagree.
            new = dataclasses.replace(new, **{key: getattr(self.config, key) for key in pending})
        self.config = new
        if self._intake is not None:
            self._intake.config = new
        self._chain = chain
        if self.worker is not None:
            self.worker.reconfigure(new, chain)
        self._prime(new)
        log.info("configuration reloaded from %s agents=%d teams=%d routing=%d", new.source, len(new.agents),
                 len(new.teams), len(new.routing))
        return self._reloaded(True)

    def _reloaded(self, ok: bool) -> bool:
        self.metrics.config_reload(ok)
        sdnotify.notify(sdnotify.READY, "STATUS=accepting mail" if ok else
                        "STATUS=accepting mail; last reload refused, see the log")
        return ok

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            sdnotify.notify(sdnotify.READY, "STATUS=accepting mail")
            log.info("gatewayd ready")
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        sdnotify.notify(sdnotify.STOPPING, "STATUS=draining")
        grace = self.config.shutdown_grace
        for server in self._running.servers:
            server.close()
        reply = f"421 4.3.2 {self.config.hostname} Service shutting down, try again later"
        idle = self._sessions.close(reply, idle_only=True)
        log.info("shutting down: no new connections; closed %d idle sessions; waiting up to %.0fs for "
                 "%d transactions in progress", idle, grace, self._sessions.busy())
        deadline = time.monotonic() + grace
        while self._in_progress() and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL)
            self._sessions.close(reply, idle_only=True)
        abandoned = self._sessions.close(reply, idle_only=False)
        if abandoned:
            log.warning("shutdown grace of %.0fs over: closed %d sessions with transactions in progress "
                        "(none of them had a 250; their clients will retry)", grace, abandoned)
        if self.worker is not None:
            await self.worker.stop(max(0.0, deadline - time.monotonic()))
        if self._worker_lock is not None:
            self._worker_lock.close()
        if self.store is not None:
            await self.store.close()
        log.info("gatewayd stopped")

    def _in_progress(self) -> bool:
        return self._sessions.busy() > 0 or any(s.in_data for s in self._running.stats.values())
