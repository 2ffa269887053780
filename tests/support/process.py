"""gatewayd as a real subprocess, for specs about crashes, signals and start-up refusals."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.support.smtp import Client


async def start_daemon(config_path: Path, port: int, log: Path, *, attempts: int = 200) -> asyncio.subprocess.Process:
    """Starts ``gatewayd run`` and returns once ``port`` greets; fails (killing it) after ~10 s."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", "run", "-c", str(config_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=log.open("ab"))
    for _ in range(attempts):
        try:
            client = await Client.connect(port)
            await client.reply()
            await client.close()
            return process
        except (ConnectionError, OSError):
            if process.returncode is not None:
                break
            await asyncio.sleep(0.05)
    if process.returncode is None:
        process.kill()
        await process.wait()
    raise AssertionError(f"gatewayd did not start; see {log}")


async def run_gatewayd(*args: str, timeout: float = 30) -> tuple[int, str]:
    """Runs ``python -m gatewayd ARGS`` to completion; ``(exit code, stderr)``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"gatewayd {' '.join(args)} still running after {timeout}s") from None
    return process.returncode or 0, err.decode("utf-8", "replace")
