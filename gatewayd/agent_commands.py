"""Agent commands: ``#ack``, ``#close`` ... lines at the top of an agent's reply.

Only the leading block counts (blank lines allowed between commands); the
first line that is not a known command ends it, so a ``#`` further down, in a
quote or in prose, is text. An unknown ``#word`` at the top is text too: it is
relayed rather than silently eaten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRIORITIES = ("high", "normal", "low")
_LINE = re.compile(r"^#(ack|close|reopen|assign|note|priority)\b[ \t]*(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Command:
    name: str
    argument: str = ""


@dataclass(frozen=True)
class Parsed:
    commands: tuple[Command, ...]
    text: str
    problems: tuple[str, ...] = ()

    @property
    def has_text(self) -> bool:
        return bool(self.text.strip())


def parse(body: str) -> Parsed:
    """Splits ``body`` into its leading commands and the text to relay."""
    lines = body.replace("\r\n", "\n").split("\n")
    commands: list[Command] = []
    problems: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if not line:
            index += 1
            continue
        match = _LINE.match(line)
        if match is None:
            break
        name, argument = match.group(1).lower(), match.group(2).strip()
        problem = _check(name, argument)
        if problem:
            problems.append(f"{line}: {problem}")
        else:
            commands.append(Command(name, argument.lower() if name in ("assign", "priority") else argument))
        index += 1
    return Parsed(tuple(commands), "\n".join(lines[index:]), tuple(problems))


def _check(name: str, argument: str) -> str | None:
    if name in ("ack", "close", "reopen") and argument:
        return f"#{name} takes no argument"
    if name == "assign" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", argument):
        return "#assign needs an agent or team name"
    if name == "note" and not argument:
        return "#note needs text"
    if name == "priority" and argument.lower() not in PRIORITIES:
        return "#priority takes high, normal or low"
    return None
