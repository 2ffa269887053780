"""Everything that happens to a message after its ``250``: routing, delivery, replies and the SLA clock.

Intake only commits messages and work rows; this part takes the work from the
store. ``gatewayd run`` runs it in a worker process of its own
(:mod:`gatewayd.worker_process`), so that routing and delivery get a core of
their own instead of halving the pace of the SMTP sessions; tests and
``gatewayd run --one-process`` run it on the daemon's loop. The code is the
same either way: both see each other only through the store.
"""

from __future__ import annotations

import asyncio

from .agent_reply import AgentReplies, dkim_signer
from .config import Config
from .discovery import RoutingChain
from .ids import TicketIds
from .metrics import Metrics
from .outbox import Outbox
from .router import Router
from .sla import SlaClock
from .store import Store


class Worker:
    def __init__(self, config: Config, store: Store, metrics: Metrics, chain: RoutingChain) -> None:
        self.config = config
        ids = TicketIds(config.tickets.prefix, config.hostname, config.support.reply_secret.encode())
        self.outbox = Outbox(config, store, metrics)
        self.router = Router(config, store, ids, chain, metrics, on_enqueued=self.outbox.wake)
        replies = AgentReplies(lambda: self.config, store, ids, metrics, on_enqueued=self.outbox.wake,
                               on_reoffer=self.router.wake, sign=dkim_signer(config))
        self.router.handlers.update(agent_reply=replies.handle, handover=replies.handover)
        self.sla = SlaClock(lambda: self.config, store, ids, on_reoffer=self.router.wake,
                            on_enqueued=self.outbox.wake)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Starts the router, the outbox and the SLA clock on the running loop; each first catches up
        with what the store already holds."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.router.run(), name="router"),
                       loop.create_task(self.outbox.run(), name="outbox"),
                       loop.create_task(self.sla.run(), name="sla")]

    def wake(self) -> None:
        """New work was committed: route it now instead of at the next poll."""
        self.router.wake()

    def reconfigure(self, config: Config, chain: RoutingChain) -> None:
        """Agents, teams, routing and SLA settings of a reloaded config; the rest waits for a restart."""
        self.config = config
        self.router.reconfigure(config, chain)

    async def stop(self, grace: float) -> None:
        """Stops routing and scanning, lets deliveries in flight finish within ``grace`` seconds."""
        self.router.stop()
        self.sla.stop()
        await self.outbox.stop(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
