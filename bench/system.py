"""What the machine can do, and what processes cost: fsync rate and resident memory."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def fsync_rate(folder: Path, seconds: float = 2.0) -> float:
    """4 KB write + fsync per iteration, as a commit needs: the ceiling on one-commit-per-message."""
    path = folder / "fsync.probe"
    count = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"x" * 4096
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            os.pwrite(fd, block, (count % 256) * 4096)
            os.fsync(fd)
            count += 1
    finally:
        os.close(fd)
        path.unlink()
    return count / seconds


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size summed over processes: shared pages counted once, unlike summed RSS."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class PeakRss:
    """Samples the summed PSS of ``pids()`` every 50 ms in a thread; ``peak`` is the maximum seen."""

    def __init__(self, pids) -> None:
        self._pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, pss_bytes(self._pids()))
            except (OSError, ValueError):
                pass
            self._stop.wait(0.05)
