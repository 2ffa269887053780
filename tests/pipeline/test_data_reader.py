"""The bulk DATA reader: same section, same refusals as a line-by-line reader, never past the final dot."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.data_reader import DataSection, has_long_line, read_section, unstuff

LINE_LIMIT = 1001


def reference(stream: bytes, size_limit: int | None, line_limit: int) -> tuple[DataSection, bytes]:
    """RFC 5321 § 4.5.2 read one CRLF-ended line at a time (as aiosmtpd does); returns the rest too."""
    lines: list[bytes] = []
    pos = 0
    while True:
        end = stream.index(b"\r\n", pos) + 2
        line = stream[pos:end]
        pos = end
        if line == b".\r\n":
            break
        lines.append(line)
    size = sum(map(len, lines))
    rest = stream[pos:]
    if size_limit is not None and size > size_limit:
        return DataSection(b"", "too_big", size), rest
    if any(len(line) > line_limit for line in lines):
        return DataSection(b"", "line_too_long", size), rest
    return DataSection(b"".join(line[1:] if line.startswith(b".") else line for line in lines), None, size), rest


def stuff(content: bytes) -> bytes:
    """What a client sends for ``content`` (CRLF-ended), final dot included."""
    lines = content.split(b"\r\n")[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


async def read(stream: bytes, chunks: list[int] | None = None, *, buffer: int = 64,
               size_limit: int | None = None, line_limit: int = LINE_LIMIT) -> tuple[DataSection, bytes]:
    """Feeds ``stream`` in pieces of the given sizes and returns the section and what stayed unread."""
    reader = asyncio.StreamReader(limit=buffer)

    async def feed() -> None:
        pos = 0
        for size in chunks or [len(stream)]:
            reader.feed_data(stream[pos:pos + size])
            pos += size
            await asyncio.sleep(0)
        reader.feed_data(stream[pos:])
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    section = await read_section(reader, size_limit=size_limit, line_limit=line_limit)
    await feeder
    return section, await reader.read()


class TestEndOfData:
    async def test_an_empty_section(self):
        assert await read(b".\r\nQUIT\r\n") == (DataSection(b"", None, 0), b"QUIT\r\n")

    async def test_a_one_line_message_ends_at_the_next_dot_line(self):
        section, rest = await read(b"Subject: x\r\n.\r\nMAIL FROM:<a@b.test>\r\n")
        assert section.content == b"Subject: x\r\n"
        assert rest == b"MAIL FROM:<a@b.test>\r\n"

    @pytest.mark.parametrize("sequence", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"])
    async def test_a_dot_between_bare_line_breaks_never_ends_the_section(self, sequence):
        stream = b"Subject: a\r\n\r\nbody" + sequence + b"MAIL FROM:<evil@x.test>\r\n.\r\nQUIT\r\n"
        section, rest = await read(stream, [1] * len(stream))
        assert section.content.endswith(b"MAIL FROM:<evil@x.test>\r\n")
        assert (section, rest) == reference(stream, None, LINE_LIMIT)
        assert rest == b"QUIT\r\n"

    async def test_the_final_dot_split_across_every_possible_boundary(self):
        stream = b"a\r\nb\r\n.\r\nNOOP\r\n"
        for cut in range(1, len(stream)):
            assert await read(stream, [cut]) == (DataSection(b"a\r\nb\r\n", None, 6), b"NOOP\r\n")

    async def test_a_client_that_hangs_up_before_the_final_dot(self):
        with pytest.raises(asyncio.IncompleteReadError):
            await read(b"Subject: x\r\n\r\nhalf a message\r\n")


class TestTransparency:
    async def test_leading_dots_are_removed_once(self):
        section, _ = await read(b"..\r\n...x\r\n.y\r\nz.\r\n.\r\n")
        assert section.content == b".\r\n..x\r\ny\r\nz.\r\n"

    def test_unstuff_touches_only_line_starts(self):
        assert unstuff(b".a\r\nb.c\r\n..\r\n") == b"a\r\nb.c\r\n.\r\n"


class TestLimits:
    async def test_a_section_of_exactly_the_size_limit_is_accepted(self):
        content = b"x" * 98 + b"\r\n"
        section, _ = await read(stuff(content), size_limit=100)
        assert section == DataSection(content, None, 100)

    async def test_one_byte_over_the_size_limit_is_refused_after_the_final_dot(self):
        section, rest = await read(stuff(b"x" * 99 + b"\r\n") + b"NOOP\r\n", size_limit=100)
        assert (section.problem, section.content, rest) == ("too_big", b"", b"NOOP\r\n")

    async def test_an_oversize_section_arriving_in_pieces_is_refused_with_its_full_size(self):
        content = b"y" * 60 + b"\r\n" * 200
        section, rest = await read(stuff(content) + b"NOOP\r\n", [7] * 80, size_limit=50)
        assert section == DataSection(b"", "too_big", len(content))
        assert rest == b"NOOP\r\n"

    async def test_a_line_at_the_line_limit_is_accepted_and_one_byte_more_is_refused(self):
        fits = b"y" * (LINE_LIMIT - 2) + b"\r\n"
        assert (await read(stuff(fits)))[0].content == fits
        too_long = b"y" * (LINE_LIMIT - 1) + b"\r\n"
        section, rest = await read(stuff(too_long) + b"NOOP\r\n")
        assert (section.problem, rest) == ("line_too_long", b"NOOP\r\n")

    async def test_a_section_of_megabytes_is_finished_off_the_loop_with_the_same_rules(self):
        content = (b".dotted line\r\n" + b"x" * 80 + b"\r\n") * 30_000
        section, rest = await read(stuff(content) + b"QUIT\r\n", buffer=65536)
        assert (section.content, section.problem, rest) == (content, None, b"QUIT\r\n")
        too_long = content + b"y" * LINE_LIMIT + b"\r\n"
        assert (await read(stuff(too_long), buffer=65536))[0].problem == "line_too_long"

    def test_long_line_search_counts_the_crlf(self):
        assert not has_long_line(b"ab\r\n" * 10, 4)
        assert has_long_line(b"ab\r\nabc\r\n", 4)
        assert has_long_line(b"ab\r\n" * 10 + b"abc\r\n", 4)
        assert not has_long_line(b"a\nb\nc\r\n", 7)
        assert has_long_line(b"a\nb\nc\r\n", 6)


lines = st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b".", b"..", b".\r", b"\n.", b"\r", b""])),
                 max_size=40)


@given(body=lines, cuts=st.lists(st.integers(1, 50), max_size=30), buffer=st.sampled_from([8, 64, 65536]),
       size_limit=st.sampled_from([None, 40, 300]), line_limit=st.sampled_from([10, 1001]))
@settings(max_examples=300, deadline=None)
def test_bulk_reading_agrees_with_line_by_line_reading(body, cuts, buffer, size_limit, line_limit):
    """Any content, any chunking, any buffer size: same section, same refusal, same bytes left over."""
    content = b"".join(line.replace(b"\r\n", b"\n") + b"\r\n" for line in body)
    stream = stuff(content) + b"RSET\r\n"
    expected = reference(stream, size_limit, line_limit)
    got = asyncio.run(read(stream, cuts, buffer=buffer, size_limit=size_limit, line_limit=line_limit))
    assert got == expected
