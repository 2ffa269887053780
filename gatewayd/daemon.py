"""The daemon: owns the one event loop's long-running parts and their order of start and stop.

Start: store (checked, migrated) → workers → listeners → metrics endpoint.
SIGTERM: stop accepting, let transactions in DATA finish within
``shutdown_grace``, stop the workers, close the store, exit 0. Nothing that got a
``250`` is lost, because it was committed before the ``250``.
SIGHUP: reload agents, teams and routing; an invalid file is refused and the
running configuration stays.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field

from . import config as config_module
from .config import Config
from .discovery import load_chain
from .errors import ConfigError
from .http import serve
from .ids import TicketIds
from .intake import Intake
from .listener import ListenerStats, SessionHandler, protocol_factory, start_server
from .metrics import CONTENT_TYPE, Metrics
from .outbox import Outbox
from .router import Router
from .store import Store

log = logging.getLogger("gatewayd.daemon")


@dataclass
class _Running:
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stats: dict[str, ListenerStats] = field(default_factory=dict)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self._chain = load_chain(config, self.metrics)
        self._stop = asyncio.Event()
        self._shut_down = False
        self._running = _Running()
        self.store: Store | None = None
        self.router: Router | None = None
        self.outbox: Outbox | None = None

    async def start(self) -> None:
        config = self.config
        self.store = await Store.open(config.store.path, check=True)
        ids = TicketIds(config.tickets.prefix, config.hostname, config.support.reply_secret.encode())
        self.outbox = Outbox(config, self.store, self.metrics)
        self.router = Router(config, self.store, ids, self._chain, self.metrics, on_enqueued=self.outbox.wake)
        intake = Intake(config, self.store, ids, on_committed=self.router.wake)
        loop = asyncio.get_running_loop()
        self._running.tasks += [loop.create_task(self.router.run(), name="router"),
                                loop.create_task(self.outbox.run(), name="outbox")]
        self.metrics.prime((l.name for l in config.listeners), (t.name for t in config.teams),
                           ((team, a.name) for a in config.agents for team in a.teams))
        for listener in config.listeners:
            stats = ListenerStats()
            self._running.stats[listener.name] = stats
            handler = SessionHandler(listener, config, intake, stats, observe=self.metrics.transaction)
            server = await start_server(listener, protocol_factory(listener, config, handler, stats))
            self._running.servers.append(server)
            log.info("listening protocol=%s address=%s name=%s", listener.protocol, listener.address, listener.name)
        if config.metrics.address is not None:
            endpoint = config.metrics.address
            server = await serve(endpoint.host or "127.0.0.1", endpoint.port or 9464,
                                 {"/metrics": self._metrics, "/healthz": self._healthz})
            self._running.servers.append(server)
            log.info("metrics endpoint address=%s", endpoint)

    async def _metrics(self) -> tuple[int, str, bytes]:
        assert self.store is not None
        await self.metrics.refresh(self.store, {n: s.active for n, s in self._running.stats.items()})
        return 200, CONTENT_TYPE, self.metrics.exposition()

    async def _healthz(self) -> tuple[int, str, bytes]:
        assert self.store is not None
        listening = all(server.is_serving() for server in self._running.servers)
        if listening and await self.store.writable():
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"store not writable or listeners down\n"

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """Re-reads the config file; agents, teams and routing take effect for the next message."""
        try:
            new = config_module.load(self.config.source)
            chain = load_chain(new, self.metrics)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            return
        if new.listeners != self.config.listeners or new.store != self.config.store:
            log.warning("reload: listener and store changes need a restart; other changes applied")
        self.config = new
        self._chain = chain
        if self.router is not None:
            self.router.reconfigure(new, chain)
        log.info("configuration reloaded from %s", new.source)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        log.info("gatewayd ready")
        try:
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        log.info("shutting down: no new connections; waiting up to %.0fs for transactions in progress",
                 self.config.shutdown_grace)
        for server in self._running.servers:
            server.close()
        deadline = time.monotonic() + self.config.shutdown_grace
        while any(s.in_data for s in self._running.stats.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.router is not None:
            self.router.stop()
        if self.outbox is not None:
            await self.outbox.stop(max(0.0, deadline - time.monotonic()))
        for task in self._running.tasks:
            task.cancel()
        await asyncio.gather(*self._running.tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        log.info("gatewayd stopped")
