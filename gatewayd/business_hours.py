"""Business hours and the promise a receipt makes: "we answer by Tuesday 10:00 CET".

With business hours configured, the first-response target counts working time
only (the usual helpdesk meaning: 8h is one working day of 09:00-17:00); a
message arriving on Friday afternoon is promised an answer on Monday, not on
Saturday. Without them, the target is plain elapsed time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DAY_MINUTES = 24 * 60
_MAX_DAYS = 400  # a year of holidays cannot make the search run away

Week = tuple[tuple[tuple[int, int], ...], ...]
"""Opening spans per weekday (index 0 = Monday): ``(begin, end)`` in minutes from local midnight, sorted,
not overlapping, ``end`` up to 1440."""


class HoursError(ValueError):
    """An hours mapping that does not parse; ``key`` is the day entry at fault."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def parse_hours(hours: Mapping[str, Any]) -> Week:
    """Working hours per weekday, in the one grammar of ``business_hours.hours`` and the ``schedule`` plugin.

    Keys are days (``mon``..``sun``), ranges that may wrap (``mon-fri``,
    ``fri-mon``) and comma lists (``sat,sun``). A value is a time range
    ``"HH:MM-HH:MM"``, several (a list, or one string with commas), or
    ``off``. Entries apply in order: ranges add to their days, ``off`` closes
    them (``{mon-sun: "09:00-17:00", sun: off}``). A range that ends before it
    starts runs past midnight (``"22:00-06:00"``: to 24:00, and from 00:00 the
    next day). Spans of one day that overlap or touch are merged; a mapping
    with no span at all parses to a week that is never open.
    """
    shifts: list[list[tuple[int, int]]] = [[] for _ in _DAYS]
    for key, value in hours.items():
        days = _days(str(key))
        spans = _spans(str(key), value)
        for day in days:
            if spans:
                shifts[day].extend(spans)
            else:
                shifts[day].clear()
    week: list[list[tuple[int, int]]] = [[] for _ in _DAYS]
    for day, spans in enumerate(shifts):
        for begin, end in spans:
            if begin < end:
                week[day].append((begin, end))
            else:
                week[day].append((begin, _DAY_MINUTES))
                if end:
                    week[(day + 1) % 7].append((0, end))
    return tuple(_merged(spans) for spans in week)


def is_open(week: Week, local: datetime) -> bool:
    """Whether ``local`` (a time in the hours' own zone) falls in one of its day's spans."""
    minute = local.hour * 60 + local.minute
    return any(begin <= minute < end for begin, end in week[local.weekday()])


def _days(key: str) -> list[int]:
    days: list[int] = []
    for part in key.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise HoursError(key, "is not a day, day range or list (mon..sun, e.g. mon-fri or sat,sun)")
        start, stop = _DAYS.index(first), _DAYS.index(last or first)
        days.extend((start + i) % 7 for i in range((stop - start) % 7 + 1))
    return days


def _spans(key: str, value: Any) -> list[tuple[int, int]]:
    if value in ("off", False, None):
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    spans = []
    for item in items:
        if not isinstance(item, str):
            raise HoursError(key, f'{item!r} is not a time range such as "09:00-17:00" (quote it in YAML)')
        for part in (p for p in item.split(",") if p.strip()):
            match = _SPAN.match(part)
            if match is None:
                raise HoursError(key, f'{part.strip()!r} is not a time range such as "09:00-17:00"')
            h1, m1, h2, m2 = (int(g) for g in match.groups())
            begin, end = h1 * 60 + m1, h2 * 60 + m2
            if h1 > 23 or m1 > 59 or m2 > 59 or end > _DAY_MINUTES or begin == end:
                raise HoursError(key, f"{part.strip()!r} is not a time range of a day (HH:MM-HH:MM, up to 24:00)")
            spans.append((begin, end))
    return spans


def _merged(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return tuple(merged)


@dataclass(frozen=True)
class BusinessHours:
    """Opening hours per weekday (0 = Monday) as minute spans, in ``timezone``, minus holidays."""

    timezone: str
    week: Week
    holidays: frozenset[date] = frozenset()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def add(self, start: datetime, seconds: float) -> datetime:
        """The moment ``seconds`` of business time after ``start`` have passed."""
        zone = self.zone
        local = start.astimezone(zone)
        remaining = timedelta(seconds=seconds)
        day = local.date()
        for _ in range(_MAX_DAYS):
            if day not in self.holidays:
                for begin, end in self.week[day.weekday()]:
                    open_at = _at(day, begin, zone)
                    close_at = _at(day, end, zone)
                    span_start = max(open_at, local)
                    if span_start >= close_at:
                        continue
                    available = close_at - span_start
                    if remaining <= available:
                        return span_start + remaining
                    remaining -= available
            day += timedelta(days=1)
        raise ValueError("business hours leave no working time within a year")


def _at(day: date, minute: int, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone) + timedelta(minutes=minute)


def parse_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a known time zone (e.g. Europe/Berlin)") from None
    return value


def parse_holidays(values: list[Any]) -> frozenset[date]:
    try:
        return frozenset(date.fromisoformat(str(v)) for v in values)
    except ValueError as exc:
        raise ValueError(f"holidays must be dates like 2025-12-25 ({exc})") from None


def expected_by(received: datetime, target: float, hours: BusinessHours | None,
                zone: str = "UTC") -> datetime:
    """When the first response is due, in the zone it should be shown in."""
    if hours is not None:
        return hours.add(received, target).astimezone(hours.zone)
    return (received + timedelta(seconds=target)).astimezone(ZoneInfo(zone))


def describe(due: datetime, now: datetime) -> str:
    """``Tuesday 10:00 CET``, with the date added when it is a week or more away."""
    local_now = now.astimezone(due.tzinfo or timezone.utc)
    if (due.date() - local_now.date()).days >= 7:
        return due.strftime("%A %d %B %H:%M %Z").replace(" 0", " ", 1)
    return due.strftime("%A %H:%M %Z")
