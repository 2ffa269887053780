"""Fixtures for the routing-plugin tests."""

from __future__ import annotations

import pytest

from gatewayd.testing import MemoryStateStore, RecordingObserver


@pytest.fixture
def state() -> MemoryStateStore:
    return MemoryStateStore()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()
