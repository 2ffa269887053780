"""Test-side SMTP/LMTP peers on asyncio: a line-level client and a recording relay sink."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Client:
    """Speaks SMTP or LMTP line by line, so tests can pipeline and send hostile bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int | None = None, *, path: str | None = None, host: str = "127.0.0.1") -> "Client":
        if path is not None:
            reader, writer = await asyncio.open_unix_connection(path)
        else:
            reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10) -> Reply:
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError(f"connection closed after {lines!r}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), tuple(lines))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> Reply:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def greet(self, lmtp: bool = False) -> Reply:
        banner = await self.reply()
        assert banner.code == 220, banner
        return await self.cmd(("LHLO" if lmtp else "EHLO") + " client.test")

    async def data(self, content: bytes, rcpt_count: int = 1) -> list[Reply]:
        """Sends DATA and the dot-stuffed content; returns one reply (SMTP) or one per recipient (LMTP)."""
        go = await self.cmd("DATA")
        assert go.code == 354, go
        stuffed = b"\r\n".join(b"." + l if l.startswith(b".") else l for l in content.split(b"\r\n"))
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        await self.send(stuffed + b".\r\n")
        return [await self.reply() for _ in range(rcpt_count)]

    async def close(self) -> None:
        try:
            if not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
                await self.writer.drain()
        except ConnectionError:
            pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def send_message(port: int, content: bytes, *, mail_from: str = "carol@customer.test",
                       rcpts: tuple[str, ...] = ("support@example.test",), lmtp: bool = False,
                       path: str | None = None) -> list[Reply]:
    """One whole transaction; returns the DATA reply (or, for LMTP, one per recipient)."""
    client = await Client.connect(port, path=path)
    try:
        await client.greet(lmtp)
        mail = await client.cmd(f"MAIL FROM:<{mail_from}>")
        assert mail.code == 250, mail
        for rcpt in rcpts:
            reply = await client.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.code == 250, reply
        return await client.data(content, len(rcpts) if lmtp else 1)
    finally:
        await client.close()


def message(subject: str = "Printer on fire", *, sender: str = "Carol <carol@customer.test>",
            message_id: str | None = "<m1@customer.test>", extra: str = "", body: str = "Please help.\r\n") -> bytes:
    headers = f"From: {sender}\r\nTo: support@example.test\r\nSubject: {subject}\r\n"
    if message_id:
        headers += f"Message-ID: {message_id}\r\n"
    return (headers + extra + "\r\n" + body).encode("utf-8")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class SinkHandler:
    """Records what the gateway relays; ``answer`` refuses everything, ``refuse`` maps recipients to one refusal each."""

    received: list[Received] = field(default_factory=list)
    answer: str | None = None
    refuse: dict[str, str] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.answer:
            return self.answer
        for rcpt in envelope.rcpt_tos:
            if rcpt in self.refuse:
                return self.refuse.pop(rcpt)
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.arrived.set()
        return "250 2.0.0 queued"


class Sink:
    """A relay MTA stand-in on the test's loop; stop() and start() simulate an outage."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.handler = SinkHandler()
        self._server: asyncio.base_events.Server | None = None

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self.handler, hostname="relay.test", loop=loop), "127.0.0.1", self.port,
            reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.received) < count:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"relay got {len(self.received)} messages, expected {count}")
            self.handler.arrived.clear()
            try:
                await asyncio.wait_for(self.handler.arrived.wait(), min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass
        return self.received
