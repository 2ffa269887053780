"""JSON webhook delivery for outbox items of kind ``webhook`` (``rcpt`` is the URL, ``head`` the body).

Classified like SMTP so the outbox's retry machinery applies unchanged: 2xx is
sent, 408/429/5xx and network errors are retried, any other status (a redirect
too) fails.
Posts run in threads of their own (:class:`Webhooks`): an endpoint that hangs
holds those until the timeout, never the loop's default pool that parsing and
signing need meanwhile.
"""

from __future__ import annotations

import asyncio
import http.client
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .relay import SendResult


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is not the receiver taking the post (urllib would repeat it as a GET and call that a 200)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post_blocking(url: str, body: bytes, timeout: float, opener: urllib.request.OpenerDirector) -> SendResult:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "gatewayd"})
    try:
        with opener.open(request, timeout=timeout) as response:
            return SendResult("sent", f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        retry = exc.code in (408, 429) or exc.code >= 500
        return SendResult("retry" if retry else "failed", f"HTTP {exc.code} {exc.reason}"[:500])
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        return SendResult("retry", f"{type(exc).__name__}: {exc}"[:500])


class Webhooks:
    """Posts webhook bodies, at most ``concurrency`` at a time in threads of their own."""

    def __init__(self, concurrency: int, timeout: float) -> None:
        self.timeout = timeout
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="gatewayd-webhook")
        self._opener = urllib.request.build_opener(_NoRedirect())

    async def post(self, url: str, body: bytes) -> SendResult:
        return await asyncio.get_running_loop().run_in_executor(self._threads, post_blocking, url, body,
                                                                self.timeout, self._opener)

    def close(self) -> None:
        """Lets posts still in flight end on their own (each is bounded by the timeout)."""
        self._threads.shutdown(wait=False)
