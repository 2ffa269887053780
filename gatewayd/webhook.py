"""JSON webhook delivery for outbox items of kind ``webhook`` (``rcpt`` is the URL, ``head`` the body).

Classified like SMTP so the outbox's retry machinery applies unchanged: 2xx is
sent, 408/429/5xx and network errors are retried, any other status fails.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

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


async def post(url: str, body: bytes, timeout: float) -> SendResult:
    return await asyncio.to_thread(post_blocking, url, body, timeout)
