"""Throwaway Postfix and Dovecot instances and an smtp-sink, for integration tests and the benchmark.

Each instance lives in its own directory (config, queue, mail, log), listens on
loopback high ports only and is stopped afterwards; the system services are never
touched. Postfix never looks up DNS (``*_dns_support_level = disabled``) and
only ever delivers to ``[127.0.0.1]:port`` next hops, so nothing leaves the
machine. The config text these classes write is what ``docs/postfix.md`` shows.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX_MASTER_CF = """\
{listen} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
tlsmgr    unix  - - n 1000? 1 tlsmgr
postlog   unix-dgram n - n - 1 postlogd
"""


def scratch_dir(prefix: str) -> Path:
    """A fresh directory under /tmp that the postfix and dovecot users can traverse (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _cooled(path: Path) -> None:
    """Dates ``path`` a minute back: Postfix re-reads a config file written within the last second
    ("pausing to let it cool down", 0.3 s at a time), which would slow every Postfix command and daemon."""
    past = time.time() - 60
    os.utime(path, (past, past))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _tty_run(command: list[str]) -> str:
    """Runs a Postfix command with a pseudo-terminal: without syslog, that is where it reports errors."""
    done = subprocess.run(["script", "-qec", " ".join(command), "/dev/null"],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout


@dataclass
class Postfix:
    """One Postfix instance: ``smtpd`` on ``port``; ``settings`` go into main.cf after the base lines.

    ``services`` is appended to master.cf (more listeners, e.g. a relay port with ``-o`` overrides);
    ``maps`` are written to the config directory and ``postmap``-ed.
    """

    root: Path
    port: int
    settings: Mapping[str, str] = field(default_factory=dict)
    maps: Mapping[str, str] = field(default_factory=dict)
    services: str = ""

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    @property
    def log(self) -> Path:
        return self.root / "maillog"

    def main_cf(self) -> str:
        base = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.root / "queue"),
            "data_directory": str(self.root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "mx.example.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "smtputf8_enable": "yes",
            "biff": "no",
            "maillog_file_prefixes": str(self.root),
            "maillog_file": str(self.log),
        }
        base.update(self.settings)
        return "".join(f"{key} = {value}\n" for key, value in base.items())

    def write(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "queue").mkdir(exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        shutil.chown(self.root / "data", "postfix")
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(self.master_cf())
        _cooled(self.config_dir / "main.cf")
        _cooled(self.config_dir / "master.cf")
        for name, text in self.maps.items():
            (self.config_dir / name).write_text(text)
            _cooled(self.config_dir / name)
            _tty_run(["postmap", "-c", str(self.config_dir), str(self.config_dir / name)])

    def master_cf(self) -> str:
        return POSTFIX_MASTER_CF.format(listen=f"127.0.0.1:{self.port}") + self.services

    def start(self) -> None:
        self.write()
        _tty_run(["postfix", "-c", str(self.config_dir), "start"])
        wait_for_port(self.port)

    def stop(self) -> None:
        """SIGTERM to this instance's master, as ``postfix stop`` does, without its one-second naps."""
        try:
            master = int((self.root / "queue" / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if not _alive(master):
            return
        os.kill(master, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(master) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(master):
            subprocess.run(["script", "-qec", f"postfix -c {self.config_dir} abort", "/dev/null"],
                           capture_output=True, timeout=60, check=False)

    def queue_is_empty(self) -> bool:
        queue = self.root / "queue"
        return not any(p.is_file() for d in ("incoming", "active", "deferred") for p in (queue / d).rglob("*"))

    def pids(self) -> list[int]:
        """The master and all its children, for RSS sampling."""
        pid_file = self.root / "queue" / "pid" / "master.pid"
        master = int(pid_file.read_text().strip())
        children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True, check=False).stdout.split()
        return [master, *(int(c) for c in children)]


class SmtpSink:
    """Postfix's ``smtp-sink`` on a loopback port (the benchmark's ceiling and relay target)."""

    def __init__(self, port: int, backlog: int = 512) -> None:
        self.port = port
        self.backlog = backlog
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{self.port}",
                                         str(self.backlog)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
auth_username_format = %Ln
mail_location = maildir:{root}/mail/%n
default_login_user = dovenull
default_internal_user = dovecot
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={root}/mail/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
"""


# One line of the passwd-file ``users``: the mailbox name and its password (``secret``).
DOVECOT_USER = "{user}:{{PLAIN}}secret::::::\n"


@dataclass
class Dovecot:
    """Dovecot with one Maildir per user, LMTP in and IMAP out; every password is ``secret``."""

    root: Path
    lmtp_port: int
    imap_port: int
    users: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.root / "mail").mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root / "mail", "nobody", "nogroup")
        (self.root / "users").write_text("".join(DOVECOT_USER.format(user=user) for user in self.users))
        conf = self.root / "dovecot.conf"
        conf.write_text(DOVECOT_CONF.format(root=self.root, imap_port=self.imap_port, lmtp_port=self.lmtp_port))
        # Its own session, so stop() can signal this instance's master and children together.
        self.process = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=(self.root / "stderr.log").open("wb"))
        wait_for_port(self.lmtp_port)
        wait_for_port(self.imap_port)

    def stop(self) -> None:
        """SIGTERM to this instance's process group (its master alone would wait a second for the children)."""
        if self.process is not None:
            group = self.process.pid
            try:
                os.killpg(group, signal.SIGTERM)
                self.process.wait(15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                self.process.wait(5)
            self.process = None
