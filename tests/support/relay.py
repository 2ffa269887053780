"""A scripted relay MTA: answers each SMTP stage as a test says, optionally slowly.

The recording :class:`~tests.support.smtp.Sink` is aiosmtpd and always greets
with 220; faults at the banner, at MAIL or RCPT, or a relay that stalls need a
peer whose every answer the test controls.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field


@dataclass
class Script:
    """The answer per stage (``banner``, ``mail``, ``rcpt``, ``data``, ``end``) and a delay before each."""

    answers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    pipelining: bool = True  # offered in EHLO, as Postfix and most MTAs do
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this (server-side) context

    def answer(self, stage: str, default: str) -> str:
        return self.answers.get(stage, default)


class ScriptedRelay:
    def __init__(self, port: int, script: Script | None = None) -> None:
        self.port = port
        self.script = script or Script()
        self.delivered: list[bytes] = []
        self.mail_commands: list[bytes] = []
        self.sessions = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", self.port, reuse_address=True,
                                                  limit=64 * 1024 * 1024)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _say(self, writer: asyncio.StreamWriter, text: str) -> None:
        if self.script.delay:
            await asyncio.sleep(self.script.delay)
        writer.write(text.encode() + b"\r\n")
        await writer.drain()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        try:
            banner = self.script.answer("banner", "220 relay.test ESMTP")
            await self._say(writer, banner)
            if not banner.startswith("2"):
                return
            for _ in range(100):
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    pipelining = "250-PIPELINING\r\n" if self.script.pipelining else ""
                    starttls = "250-STARTTLS\r\n" if self.script.tls else ""
                    await self._say(writer, f"250-relay.test\r\n{pipelining}{starttls}250-8BITMIME\r\n250 SMTPUTF8")
                elif verb == b"STAR" and self.script.tls:
                    await self._say(writer, "220 2.0.0 ready to start TLS")
                    try:
                        await writer.start_tls(self.script.tls)
                    except (ssl.SSLError, OSError):
                        return
                elif verb == b"MAIL":
                    self.mail_commands.append(line.rstrip(b"\r\n"))
                    await self._say(writer, self.script.answer("mail", "250 2.1.0 ok"))
                elif verb == b"RCPT":
                    await self._say(writer, self.script.answer("rcpt", "250 2.1.5 ok"))
                elif verb == b"DATA":
                    await self._data(reader, writer)
                elif verb == b"QUIT":
                    await self._say(writer, "221 2.0.0 bye")
                    return
                else:
                    await self._say(writer, "250 2.0.0 ok")
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        go = self.script.answer("data", "354 go ahead")
        await self._say(writer, go)
        if not go.startswith("354"):
            return
        content = await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 30)
        end = self.script.answer("end", "250 2.0.0 queued")
        if end.startswith("250"):
            lines = content[:-3].split(b"\r\n")
            self.delivered.append(b"\r\n".join(l[1:] if l.startswith(b".") else l for l in lines))
        await self._say(writer, end)
