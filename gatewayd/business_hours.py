"""Business hours and the promise a receipt makes: "we answer by Tuesday 10:00 CET".

With business hours configured, the first-response target counts working time
only (the usual helpdesk meaning: 8h is one working day of 09:00-17:00); a
message arriving on Friday afternoon is promised an answer on Monday, not on
Saturday. Without them, the target is plain elapsed time.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DAY_MINUTES = 24 * 60
_MAX_DAYS = 400  # a year of holidays cannot make the search run away

Week = tuple[tuple[tuple[int, int], ...], ...]
"""Shifts per weekday (index 0 = Monday): ``(begin, end)`` in minutes from that day's local midnight,
sorted and not overlapping; ``end`` goes past 1440 for a shift that runs past midnight. A shift belongs to
the day it starts: that day's ``off`` and holidays close all of it."""


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
    starts runs past midnight (``"22:00-06:00"``) and belongs to the day it
    starts. Shifts of one day that overlap or touch are merged; a mapping with
    no shift at all parses to a week that is never open.
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
    return tuple(_merged([(b, e if b < e else e + _DAY_MINUTES) for b, e in spans]) for spans in shifts)


def is_open(week: Week, local: datetime, holidays: Collection[date] = frozenset()) -> bool:
    """Whether ``local`` (a time in the hours' own zone) falls in a shift, today's or last night's, that
    did not start on one of ``holidays``."""
    minute = local.hour * 60 + local.minute
    today = local.date()
    yesterday = today - timedelta(days=1)
    if today not in holidays and any(b <= minute < e for b, e in week[today.weekday()]):
        return True
    return yesterday not in holidays and any(minute + _DAY_MINUTES < e for _, e in week[yesterday.weekday()])


def _days(key: str) -> list[int]:
    days: list[int] = []
    for part in key.lower().replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if first not in _DAYS or (dash and last not in _DAYS):
            raise HoursError(key, "is not a day, day range or list (mon..sun, e.g. mon-fri or sat,sun)")
        start, stop = _DAYS.index(first), _DAYS.index(last or first)
        days.extend((start + i) % 7 for i in range((stop - start) % 7 + 1))
    return days


def _spans(key: str, value: Any) -> list[tuple[int, int]]:
    if value is False or value is None or (isinstance(value, str) and value.strip().lower() == "off"):
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
    if not spans:
        raise HoursError(key, 'has no time range (write "off" to close the day)')
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
        """The moment (in UTC) ``seconds`` of business time after ``start`` have passed.

        Counted in real time, so a shift across a DST change is as long as it
        really is, and each moment counts once when last night's shift and
        this morning's overlap.
        """
        zone = self.zone
        cursor = start.astimezone(timezone.utc)
        remaining = timedelta(seconds=seconds)
        day = start.astimezone(zone).date() - timedelta(days=1)  # last night's shift may still run
        for _ in range(_MAX_DAYS):
            if day not in self.holidays:
                for begin, end in self.week[day.weekday()]:
                    close_at = _at(day, end, zone)
                    span_start = max(_at(day, begin, zone), cursor)
                    if span_start >= close_at:
                        continue
                    available = close_at - span_start
                    if remaining <= available:
                        return span_start + remaining
                    remaining -= available
                    cursor = close_at
            day += timedelta(days=1)
        raise ValueError("business hours leave no working time within a year")


def _at(day: date, minute: int, zone: ZoneInfo) -> datetime:
    """``minute`` minutes of wall-clock time after ``day``'s local midnight, in UTC."""
    return (datetime(day.year, day.month, day.day, tzinfo=zone) + timedelta(minutes=minute)).astimezone(timezone.utc)


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
