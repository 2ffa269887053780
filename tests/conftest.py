"""Shared fixtures: a recording relay sink and a running gatewayd on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import Config
from gatewayd.daemon import Daemon
from gatewayd.store import Store
from tests.support.gateway import free_port, write_config
from tests.support.smtp import Sink


@dataclass
class Gateway:
    daemon: Daemon
    config: Config
    config_path: Path
    sink: Sink
    smtp_port: int
    lmtp_port: int

    @property
    def store(self) -> Store:
        assert self.daemon.store is not None
        return self.daemon.store


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    relay = Sink(free_port())
    await relay.start()
    yield relay
    await relay.stop()


@pytest.fixture
async def gateway_factory(tmp_path: Path, sink: Sink) -> AsyncIterator[Callable[..., Any]]:
    """``await gateway_factory(**config_overrides)`` starts a daemon; all are shut down after the test."""
    started: list[Daemon] = []

    async def start(**overrides: Any) -> Gateway:
        ports = {"smtp_port": free_port(), "lmtp_port": free_port(), "relay_port": sink.port}
        ports.update(overrides)
        path, config = write_config(tmp_path, **ports)
        daemon = Daemon(config)
        await daemon.start()
        started.append(daemon)
        return Gateway(daemon, config, path, sink, ports["smtp_port"], ports["lmtp_port"])

    yield start
    for daemon in started:
        await daemon.shutdown()


@pytest.fixture
async def gateway(gateway_factory: Callable[..., Any]) -> Gateway:
    return await gateway_factory()
