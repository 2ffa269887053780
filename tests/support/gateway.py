"""Building configs and running a real gatewayd (in-process or as a subprocess) for tests."""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path

from gatewayd import config as config_module
from gatewayd.config import Config
from tests.support.resolver import loopback_resolver

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_text(tmp: Path, *, smtp_port: int, lmtp_port: int, relay_port: int, metrics_port: int | None = None,
                extra: str = "", limits: str = "", retry: str = "{first: 0.2s, max: 1s, give_up: 1h}",
                routing: str = "  - plugin: round_robin\n", lmtp_socket: str | None = None,
                tls: tuple[Path, Path] | None = None, relay_timeout: str = "5s", relay_concurrency: int = 4,
                relay_extra: str = "",
                supervisors: tuple[str, str] = ("lead@example.test", "ciso@example.test")) -> str:
    """A complete config for tests; ``extra``/``limits``/``relay_extra`` append YAML at top level / under
    limits / under relay."""
    socket_listener = f'  - {{protocol: lmtp, address: "unix:{lmtp_socket}", name: lmtp-socket}}\n' \
        if lmtp_socket else ""
    smtp_tls = f', tls: {{cert_file: "{tls[0]}", key_file: "{tls[1]}"}}' if tls else ""
    metrics = f'metrics: {{address: "127.0.0.1:{metrics_port}"}}\n' if metrics_port else ""
    if not re.search(r"^dns:", extra, re.MULTILINE):
        extra += ("\n" if extra and not extra.endswith("\n") else "") + f'dns: {{resolver: "127.0.0.1:{loopback_resolver()}", timeout: 1s}}\n'

    return textwrap.dedent(f"""\
        hostname: gw.example.test
        listeners:
          - {{protocol: smtp, address: "127.0.0.1:{smtp_port}", name: smtp{smtp_tls}}}
          - {{protocol: lmtp, address: "127.0.0.1:{lmtp_port}", name: lmtp}}
        """) + socket_listener + textwrap.dedent(f"""\
        store: {{path: "{tmp / 'gatewayd.sqlite3'}"}}
        support:
          addresses: [support@example.test, help@example.test]
          reply_secret: "test-secret-123"
        relay:
          address: "127.0.0.1:{relay_port}"
          retry: {retry}
          timeout: {relay_timeout}
          concurrency: {relay_concurrency}
        """) + relay_extra + textwrap.dedent(f"""\
        teams:
          - {{name: support, supervisor: {supervisors[0]}}}
          - {{name: security, supervisor: {supervisors[1]}}}
        agents:
          - {{name: alice, address: alice@agents.example.test, teams: [support]}}
          - {{name: bob, address: bob@agents.example.test, teams: [support]}}
          - {{name: sam, address: sam@agents.example.test, teams: [security]}}
        fallback: {{team: support}}
        shutdown_grace: 5s
        """) + metrics + "routing:\n" + routing + ("limits:\n" + limits if limits else "") + extra


def write_config(tmp: Path, **kwargs: object) -> tuple[Path, Config]:
    path = tmp / "gatewayd.yaml"
    path.write_text(config_text(tmp, **kwargs))  # type: ignore[arg-type]
    return path, config_module.load(path)
