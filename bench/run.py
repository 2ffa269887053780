"""gatewayd against smtp-sink and a throwaway Postfix relay, on this machine, in one run.

    .venv/bin/python bench/run.py            # about 10 minutes; prints Markdown tables

All load is loopback and bounded: a fixed message count per cell and a timeout
per step. Needs Postfix (smtp-source, smtp-sink, postfix) installed; run as root
(Postfix's ``smtp-sink -u`` and the throwaway instance need it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load import idle_connections, paced, paced_sessions, percentile, smtp_source, time_to_250
from bench.system import PeakRss, fsync_rate, rss_bytes
from gatewayd.config import RELAY_CONCURRENCY
from tests.support.gateway import config_text, free_port
from tests.support.mta import Postfix, SmtpSink, scratch_dir, wait_for_port

SIZES = {"4 KB": 4 * 1024, "100 KB": 100 * 1024}
CONCURRENCY = (1, 10, 50)
COUNTS = {(4096, 1): 200, (4096, 10): 1500, (4096, 50): 3000,
          (102400, 1): 100, (102400, 10): 600, (102400, 50): 1200}
LATENCY_SAMPLES = 500
STEP_TIMEOUT = 180.0
LIGHT_LOAD_COUNT = 200
LIGHT_LOAD_RATE = 20.0
# Open-loop load over 50 sessions at these fractions of the Postfix relay's c=50 rate in the same
# run, for this many seconds: end to end at a pace both sustain, instead of a burst's backlog.
PACED_SESSIONS = 50
PACED_FRACTIONS = (0.5, 0.75, 1.0)
PACED_SECONDS = 4.0


@dataclass
class Paced:
    """End to end under an offered rate: a fraction of what saturates the Postfix relay.

    ``achieved`` is the rate the target accepted; ``pipeline`` (gatewayd) the
    rate its forwards reached the relay. Below ``achieved``, a backlog grew
    over the run and e2e depends on its length.
    """

    target: str
    size: str
    fraction: float
    offered: float
    achieved: float
    e2e_p50: float
    e2e_p99: float
    pipeline: float | None = None


@dataclass
class Cell:
    target: str
    size: str
    sessions: int
    rate: float
    p50: float
    p99: float
    rss: int
    e2e_p50: float | None = None
    e2e_p99: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


class Gatewayd:
    """``gatewayd run`` (daemon and worker process) with a fresh store, relaying to ``relay_port``."""

    def __init__(self, relay_port: int, dns_port: int, max_connections: int = 1200) -> None:
        self.root = scratch_dir("gw-bench-")
        self.port = free_port()
        self.metrics_port = free_port()
        # The tests' config with the daemon's own relay concurrency (the tests use 4).
        text = config_text(self.root, smtp_port=self.port, lmtp_port=free_port(), relay_port=relay_port,
                           metrics_port=self.metrics_port, limits=f"  max_connections: {max_connections}\n",
                           relay_concurrency=RELAY_CONCURRENCY,
                           extra=f'dns: {{resolver: "127.0.0.1:{dns_port}", timeout: 1s}}\n')
        (self.root / "gatewayd.yaml").write_text(text)
        self.store = self.root / "gatewayd.sqlite3"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.root / "gatewayd.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gatewayd", "run", "-c", str(self.root / "gatewayd.yaml")],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        wait_for_port(self.port)

    def pids(self) -> list[int]:
        """The daemon and its worker process."""
        if self.process is None:
            return []
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [self.process.pid, *map(int, children.read_text().split())]
        except OSError:
            return [self.process.pid]

    def commits(self) -> int:
        """Store commits so far, both processes (gatewayd_store_commits_total)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return int(float(re.search(r"^gatewayd_store_commits_total (\S+)$", text, re.M).group(1)))

    def stop(self) -> None:
        """Stops gatewayd and removes its store (over 600 MB after a 100 KB cell); its log stays."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.process = None
        for path in self.root.glob("gatewayd.sqlite3*"):
            path.unlink()

    def drain(self, timeout: float) -> None:
        """Waits until every forward is sent (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with sqlite3.connect(f"file:{self.store}?mode=ro", uri=True) as db:
                pending = db.execute("SELECT count(*) FROM work WHERE done_at IS NULL").fetchone()[0]
                pending += db.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
            if pending == 0:
                return
            time.sleep(0.2)

    def end_to_end(self) -> tuple[list[float], int, float]:
        """Seconds from intake to the relay's 250 for every forward, the number of accepted messages, and
        forwards per second from the first acceptance to the last forward (the whole pipeline's pace)."""
        with sqlite3.connect(f"file:{self.store}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT m.received_at, o.updated_at FROM outbox o JOIN messages m ON m.id = o.message "
                "WHERE o.kind = 'forward' AND o.state = 'sent'").fetchall()
            accepted = db.execute("SELECT count(*) FROM messages WHERE direction = 'in'").fetchone()[0]
        span = max(sent for _, sent in rows) - min(received for received, _ in rows) if rows else 0.0
        return [sent - received for received, sent in rows], accepted, len(rows) / span if span else 0.0


class NoopServer:
    """aiosmtpd answering 250 to every message (``noop_server.py``): the ceiling of any aiosmtpd-based daemon."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(REPO / "bench" / "noop_server.py"), str(self.port)],
                                        cwd=REPO, stdout=subprocess.DEVNULL)
        wait_for_port(self.port)

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process else []

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def postfix_delays(log: Path) -> list[float]:
    """Postfix's own ``delay=`` (arrival to delivery) for every message it relayed."""
    return [float(m.group(1)) for m in re.finditer(r"delay=([0-9.]+),[^\n]*status=sent", log.read_text())] \
        if log.exists() else []


def run_cell(target: str, port: int, pids, size: int, sessions: int) -> tuple[float, list[float], int]:
    count = COUNTS[(size, sessions)]
    with PeakRss(pids) as peak:
        throughput = smtp_source(port, size, sessions, count, STEP_TIMEOUT)
        samples = time_to_250(port, size, sessions, min(LATENCY_SAMPLES, count), STEP_TIMEOUT)
    print(f"  {target:10} {size // 1024:>4} KB c={sessions:<3} {throughput.rate:8.0f} msg/s "
          f"p50 {percentile(samples, .5) * 1000:6.1f} ms  p99 {percentile(samples, .99) * 1000:6.1f} ms",
          file=sys.stderr)
    return throughput.rate, samples, peak.peak


def postfix_paced(postfix: Postfix, size: int, count: int, rate: float) -> tuple[float, list[float], None]:
    before = len(postfix_delays(postfix.log))
    achieved = paced_sessions(postfix.port, size, PACED_SESSIONS, count, rate, STEP_TIMEOUT).rate
    deadline = time.monotonic() + STEP_TIMEOUT
    while not postfix.queue_is_empty() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    return achieved, postfix_delays(postfix.log)[before:], None


def gatewayd_paced(relay_port: int, dns_port: int, size: int, count: int,
                   rate: float) -> tuple[float, list[float], float]:
    gateway = Gatewayd(relay_port, dns_port)
    try:
        gateway.start()
        achieved = paced_sessions(gateway.port, size, PACED_SESSIONS, count, rate, STEP_TIMEOUT).rate
        gateway.drain(STEP_TIMEOUT)
        delays, _, pipeline = gateway.end_to_end()
    finally:
        gateway.stop()
    return achieved, delays, pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--targets", default="smtp-sink,aiosmtpd,postfix,gatewayd",
                        help="comma-separated subset of smtp-sink,aiosmtpd,postfix,gatewayd (to iterate on one cell)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of: 4 KB,100 KB")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="e.g. 10,50")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the fsync rate, light-load and idle-RSS measurements")
    args = parser.parse_args()
    targets = set(args.targets.split(","))
    sizes = {label: SIZES[label] for label in args.sizes.split(",")}
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the finally below stops every helper
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))

    cells: list[Cell] = []
    ceiling = SmtpSink(free_port())
    relay_sink = SmtpSink(free_port())
    postfix = Postfix(scratch_dir("pf-bench-"), free_port(), settings={
        "relayhost": f"[127.0.0.1]:{relay_sink.port}", "default_process_limit": "200",
        "smtpd_client_connection_count_limit": "0", "smtpd_client_connection_rate_limit": "0"})
    noop = NoopServer(free_port())
    dns_port = free_port()
    resolver = subprocess.Popen([sys.executable, str(REPO / "bench" / "dns_stub.py"), str(dns_port)], cwd=REPO)
    try:
        ceiling.start()
        noop.start()
        relay_sink.start()
        postfix.start()
        if args.no_extras:
            disk = math.nan
        else:
            probe = scratch_dir("fsync-")
            disk = fsync_rate(probe)
            probe.rmdir()
        print(f"fsync rate: {disk:.0f}/s", file=sys.stderr)
        for label, size in sizes.items():
            for sessions in concurrency:
                assert ceiling.process is not None
                if "smtp-sink" in targets:
                    rate, samples, rss = run_cell("smtp-sink", ceiling.port, lambda: [ceiling.process.pid], size,
                                                  sessions)
                    cells.append(Cell("smtp-sink", label, sessions, rate, percentile(samples, .5),
                                      percentile(samples, .99), rss))

                if "aiosmtpd" in targets:
                    rate, samples, rss = run_cell("aiosmtpd", noop.port, noop.pids, size, sessions)
                    cells.append(Cell("aiosmtpd", label, sessions, rate, percentile(samples, .5),
                                      percentile(samples, .99), rss))

                if "postfix" in targets:
                    before = len(postfix_delays(postfix.log))
                    rate, samples, rss = run_cell("postfix", postfix.port, postfix.pids, size, sessions)
                    deadline = time.monotonic() + STEP_TIMEOUT
                    while not postfix.queue_is_empty() and time.monotonic() < deadline:
                        time.sleep(0.2)
                    time.sleep(1.5)
                    delays = postfix_delays(postfix.log)[before:]
                    cells.append(Cell("postfix", label, sessions, rate, percentile(samples, .5),
                                      percentile(samples, .99), rss, percentile(delays, .5), percentile(delays, .99)))

                if "gatewayd" not in targets:
                    continue
                gateway = Gatewayd(relay_sink.port, dns_port)
                try:
                    gateway.start()
                    rate, samples, rss = run_cell("gatewayd", gateway.port, gateway.pids, size, sessions)
                    gateway.drain(STEP_TIMEOUT)
                    delays, accepted, drained = gateway.end_to_end()
                    commits = gateway.commits()
                finally:
                    gateway.stop()
                cells.append(Cell("gatewayd", label, sessions, rate, percentile(samples, .5), percentile(samples, .99),
                                  rss, percentile(delays, .5), percentile(delays, .99),
                                  {"commits_per_message": commits / max(1, accepted), "drained": drained,
                                   "accepted": accepted, "commits": commits}))

        paced_cells: list[Paced] = []
        for label, size in sizes.items():
            saturated = next((c.rate for c in cells if (c.target, c.size, c.sessions) == ("postfix", label, 50)), None)
            if saturated is None:
                print(f"  no open-loop table for {label}: it needs the postfix target at concurrency 50",
                      file=sys.stderr)
                continue
            for fraction in PACED_FRACTIONS:
                rate = saturated * fraction
                count = max(1, int(rate * PACED_SECONDS) // PACED_SESSIONS) * PACED_SESSIONS
                for target in ("postfix", "gatewayd"):
                    if target not in targets:
                        continue
                    achieved, delays, pipeline = (
                        postfix_paced(postfix, size, count, rate) if target == "postfix"
                        else gatewayd_paced(relay_sink.port, dns_port, size, count, rate))
                    paced_cells.append(Paced(target, label, fraction, rate, achieved, percentile(delays, .5),
                                             percentile(delays, .99), pipeline))
                    print(f"  {target:10} {label:>6} paced {rate:6.0f} msg/s (achieved {achieved:.0f}): e2e p50 "
                          f"{percentile(delays, .5) * 1000:.1f} ms, p99 {percentile(delays, .99) * 1000:.1f} ms",
                          file=sys.stderr)

        if args.no_extras:
            baseline = idle_rss = 0
            light = []
        else:
            baseline, idle_rss, light = extras(relay_sink.port, dns_port)
    finally:
        resolver.terminate()
        resolver.wait(10)
        postfix.stop()
        shutil.rmtree(postfix.root, ignore_errors=True)
        noop.stop()
        relay_sink.stop()
        ceiling.stop()

    print(render(cells, paced_cells, disk, baseline, idle_rss, light, extra_lines=not args.no_extras))
    if args.json:
        figures = {"fsync_per_s": disk, "idle_rss_baseline": baseline, "light_e2e": light, "idle_rss_1000": idle_rss,
                   "cells": [c.__dict__ for c in cells], "paced": [p.__dict__ for p in paced_cells]}
        args.json.write_text(json.dumps(_no_nan(figures), indent=2))
    return 0


def extras(relay_port: int, dns_port: int) -> tuple[int, int, list[float]]:
    """gatewayd's RSS idle and with 1,000 idle sessions, and its e2e at a light steady load."""
    gateway = Gatewayd(relay_port, dns_port)
    try:
        gateway.start()
        paced(gateway.port, 4096, LIGHT_LOAD_COUNT, LIGHT_LOAD_RATE, STEP_TIMEOUT)
        gateway.drain(STEP_TIMEOUT)
        light, _, _ = gateway.end_to_end()
    finally:
        gateway.stop()

    gateway = Gatewayd(relay_port, dns_port)
    try:
        gateway.start()
        baseline = rss_bytes(gateway.pids())
        held = idle_connections(gateway.port, 1000, 60)
        time.sleep(1.0)
        idle_rss = rss_bytes(gateway.pids())
        for sock in held:
            sock.close()
    finally:
        gateway.stop()
    return baseline, idle_rss, light


def _no_nan(value: Any) -> Any:
    """NaN (a figure not measured) as null: strict JSON parsers refuse NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _no_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_no_nan(item) for item in value]
    return value


def render(cells: list[Cell], paced_cells: list[Paced], disk: float, baseline: int, idle_rss: int,
           light: list[float], extra_lines: bool = True) -> str:
    def ms(value: float | None) -> str:
        return "–" if value is None or math.isnan(value) else f"{value * 1000:.1f}"

    by_key = {(c.target, c.size, c.sessions): c for c in cells}
    lines = [("| target | size | conc | msg/s | p50 to 250 (ms) | p99 to 250 (ms) | e2e p50 (ms) | e2e p99 (ms) "
              "| peak PSS (MB) | gw/postfix | gw/aiosmtpd | gw/smtp-sink | commits/msg | pipeline msg/s |"),
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for c in cells:
        ratio_pf = ratio_noop = ratio_sink = commits = drained = ""
        if c.target == "gatewayd":
            postfix = by_key.get(("postfix", c.size, c.sessions))
            noop = by_key.get(("aiosmtpd", c.size, c.sessions))
            sink = by_key.get(("smtp-sink", c.size, c.sessions))
            ratio_pf = f"{c.rate / postfix.rate:.2f}" if postfix else ""
            ratio_noop = f"{c.rate / noop.rate:.2f}" if noop else ""
            ratio_sink = f"{c.rate / sink.rate:.2f}" if sink else ""
            commits = f"{c.extra['commits_per_message']:.2f}"
            drained = f"{c.extra['drained']:.0f}"
        lines.append(f"| {c.target} | {c.size} | {c.sessions} | {c.rate:.0f} | {ms(c.p50)} | {ms(c.p99)} "
                     f"| {ms(c.e2e_p50)} | {ms(c.e2e_p99)} | {c.rss / 2**20:.0f} | {ratio_pf} | {ratio_noop} | {ratio_sink} | {commits} | {drained} |")
    if paced_cells:
        lines += ["", f"End to end under open-loop load ({PACED_SESSIONS} sessions, a fraction of the Postfix "
                      "relay's c=50 rate above):", "",
                  "| target | size | fraction | offered msg/s | accepted msg/s | pipeline msg/s | e2e p50 (ms) "
                  "| e2e p99 (ms) |",
                  "|---|---|--:|--:|--:|--:|--:|--:|"]
        lines += [f"| {p.target} | {p.size} | {p.fraction:.2f} | {p.offered:.0f} | {p.achieved:.0f} "
                  f"| {'' if p.pipeline is None else f'{p.pipeline:.0f}'} | {ms(p.e2e_p50)} | {ms(p.e2e_p99)} |"
                  for p in paced_cells]
    if extra_lines:
        lines += ["", f"Disk fsync rate (4 KB write + fsync): {disk:.0f}/s",
                  (f"gatewayd end to end at {LIGHT_LOAD_RATE:.0f} msg/s (4 KB, {len(light)} forwards): "
                   f"p50 {ms(percentile(light, .5))} ms, p99 {ms(percentile(light, .99))} ms"),
                  f"gatewayd RSS idle: {baseline / 2**20:.1f} MB; with 1,000 idle sessions: {idle_rss / 2**20:.1f} MB"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
