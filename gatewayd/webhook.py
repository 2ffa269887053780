"""JSON webhook delivery for outbox items of kind ``webhook`` (``rcpt`` is the URL, ``head`` the body).

Classified like SMTP so the outbox's retry machinery applies unchanged: 2xx is
sent, 408/429/5xx and network errors are retried, any other status fails.
Posts run in threads of their own (:class:`Webhooks`): an endpoint that hangs
holds those until the timeout, never the loop's default pool that parsing and
signing need meanwhile.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .relay import SendResult


def post_blocking(url: str, body: bytes, timeout: float) -> SendResult:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "gatewayd"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return SendResult("sent", f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        retry = exc.code in (408, 429) or exc.code >= 500
        return SendResult("retry" if retry else "failed", f"HTTP {exc.code} {exc.reason}"[:500])
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return SendResult("retry", f"{type(exc).__name__}: {exc}"[:500])


class Webhooks:
    """Posts webhook bodies, at most ``concurrency`` at a time in threads of their own."""

    def __init__(self, concurrency: int, timeout: float) -> None:
        self.timeout = timeout
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="gatewayd-webhook")

    async def post(self, url: str, body: bytes) -> SendResult:
        return await asyncio.get_running_loop().run_in_executor(self._threads, post_blocking, url, body, self.timeout)

    def close(self) -> None:
        """Lets posts still in flight end on their own (each is bounded by the timeout)."""
        self._threads.shutdown(wait=False)
