"""A bystander session that keeps asking NOOP while a test misbehaves elsewhere.

Robustness specs use it to state "other sessions keep getting answers within a
second": if parsing or a hostile client ever blocks the event loop, the
bystander's slowest answer shows it.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from tests.support.smtp import Client


class Bystander:
    """``async with Bystander(port) as b: ...`` then check ``b.slowest`` and ``b.answers``."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.port = port
        self.interval = interval
        self.slowest = 0.0
        self.answers = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: Client | None = None

    async def __aenter__(self) -> Bystander:
        self._client = await Client.connect(self.port)
        await self._client.greet()
        self._task = asyncio.get_running_loop().create_task(self._ask())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stop.set()
        assert self._task is not None and self._client is not None
        try:
            await asyncio.wait_for(self._task, 10)
        finally:
            await self._client.close()

    async def _ask(self) -> None:
        assert self._client is not None
        while not self._stop.is_set():
            started = time.monotonic()
            reply = await self._client.cmd("NOOP")
            assert reply.code == 250, reply
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.answers += 1
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass

    def assert_responsive(self, within: float = 1.0) -> None:
        assert self._task is not None
        if self._task.done() and self._task.exception() is not None:
            raise AssertionError("the bystander session failed") from self._task.exception()
        assert self.answers > 0, "the bystander never got an answer"
        assert self.slowest < within, f"a bystander NOOP took {self.slowest:.2f}s"


async def fresh_session_answers(port: int, within: float = 1.0) -> float:
    """Seconds for a brand-new session to get its banner and EHLO answered; fails beyond ``within``."""
    started = time.monotonic()
    client = await Client.connect(port)
    try:
        reply = await asyncio.wait_for(client.greet(), within)
        assert reply.code == 250, reply
    finally:
        await client.close()
    return time.monotonic() - started
