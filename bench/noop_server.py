"""aiosmtpd with a handler that only answers 250: the framework's own ceiling, for the benchmark.

gatewayd's listener is aiosmtpd (fixed by the product), so no pipeline built
on it accepts faster than this on the same machine. It stores nothing and
reads DATA with aiosmtpd's stock line reader.

Usage: python bench/noop_server.py PORT
"""

from __future__ import annotations

import asyncio
import logging
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class Accept:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Accept(), data_size_limit=33554432, decode_data=False),
                                      "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # no record per SMTP command, as in gatewayd
    asyncio.run(serve(int(sys.argv[1])))
