"""The shipped unit: hardened as the issue asks, clean under ``systemd-analyze verify``; sd_notify on the wire."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd import sdnotify
from gatewayd.worker_process import STOP_MARGIN
from tests.support.gateway import REPO

UNIT = REPO / "systemd" / "gatewayd.service"
BINARY = "/opt/gatewayd/bin/gatewayd"


def directives() -> list[tuple[str, str, str]]:
    """``(section, key, value)`` in file order; systemd allows a key more than once."""
    found, section = [], ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def service(key: str) -> list[str]:
    return [v for s, k, v in directives() if s == "Service" and k == key]


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """Verified as installed, except that ExecStart points at a binary that exists on this machine."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    copy = tmp_path / "gatewayd.service"
    copy.write_text(UNIT.read_text().replace(BINARY, sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    assert BINARY in UNIT.read_text(), "the substitution above must have replaced something"


def test_type_notify_with_reload_and_a_stop_timeout_beyond_the_grace_period() -> None:
    assert service("Type") == ["notify"]
    assert service("NotifyAccess") == ["main"]
    assert service("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert service("KillSignal") == ["SIGTERM"]
    assert float(service("TimeoutStopSec")[0].rstrip("s")) > 30 + STOP_MARGIN, \
        "shutdown_grace defaults to 30s; the worker gets STOP_MARGIN more to record its last deliveries"
    assert service("ExecStart")[0].startswith(f"{BINARY} run -c /etc/gatewayd/gatewayd.yaml")


def test_hardening() -> None:
    assert service("User") == ["gatewayd"] and service("Group") == ["gatewayd"]
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "PrivateDevices": "yes", "StateDirectory": "gatewayd", "RuntimeDirectory": "gatewayd",
                "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
                "RestrictSUIDSGID": "yes", "SystemCallArchitectures": "native"}
    for key, value in expected.items():
        assert service(key) == [value], key
    assert "@system-service" in service("SystemCallFilter")
    assert set(service("RestrictAddressFamilies")[0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_nothing_writable_outside_the_state_and_runtime_directories() -> None:
    assert service("ReadWritePaths") == []
    assert service("WorkingDirectory") == ["/var/lib/gatewayd"]


def test_notify_sends_one_datagram_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        assert sdnotify.notify(sdnotify.READY, "STATUS=accepting mail", environ={"NOTIFY_SOCKET": str(path)})
        assert server.recv(4096) == b"READY=1\nSTATUS=accepting mail"


def test_notify_reaches_an_abstract_socket(tmp_path: Path) -> None:
    name = f"gatewayd-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert sdnotify.notify(sdnotify.STOPPING, environ={"NOTIFY_SOCKET": "@" + name})
        assert server.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_or_with_a_dead_socket_is_a_quiet_no(tmp_path: Path) -> None:
    assert sdnotify.notify(sdnotify.READY, environ={}) is False
    assert sdnotify.notify(sdnotify.READY, environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert sdnotify.notify(sdnotify.READY, environ={"NOTIFY_SOCKET": "relative"}) is False
