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
_SPAN = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_MAX_DAYS = 400  # a year of holidays cannot make the search run away


@dataclass(frozen=True)
class BusinessHours:
    """Opening hours per weekday (0 = Monday) as minute spans, in ``timezone``, minus holidays."""

    timezone: str
    week: tuple[tuple[tuple[int, int], ...], ...]
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


def parse_week(hours: Mapping[str, Any]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``{mon-fri: "09:00-17:00", sat: "10:00-12:00, 13:00-14:00"}`` into spans per weekday."""
    week: list[list[tuple[int, int]]] = [[] for _ in _DAYS]
    for key, value in hours.items():
        days = _day_range(str(key))
        spans = [_span(part.strip()) for part in str(value).split(",") if part.strip()]
        for day in days:
            week[day].extend(spans)
    for spans in week:
        spans.sort()
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            if begin < end:
                raise ValueError("opening hours of one day overlap")
    if not any(week):
        raise ValueError("needs at least one opening span")
    return tuple(tuple(spans) for spans in week)


def parse_holidays(values: list[Any]) -> frozenset[date]:
    try:
        return frozenset(date.fromisoformat(str(v)) for v in values)
    except ValueError as exc:
        raise ValueError(f"holidays must be dates like 2025-12-25 ({exc})") from None


def _day_range(key: str) -> list[int]:
    first, _, last = key.lower().partition("-")
    if first not in _DAYS or (last and last not in _DAYS):
        raise ValueError(f"{key!r} is not a day or day range such as mon-fri")
    start = _DAYS.index(first)
    stop = _DAYS.index(last) if last else start
    if stop < start:
        raise ValueError(f"{key!r}: a day range runs forward, e.g. mon-fri")
    return list(range(start, stop + 1))


def _span(text: str) -> tuple[int, int]:
    match = _SPAN.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a span such as 09:00-17:00")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    begin, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or end > 24 * 60 or begin >= end:
        raise ValueError(f"{text!r} is not a span of one day (start before end, up to 24:00)")
    return begin, end


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
