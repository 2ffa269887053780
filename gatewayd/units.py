"""Durations and sizes as mail admins write them: ``30s``, ``15m``, ``2d``, ``32MB``."""

from __future__ import annotations

import re

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS

KB = 1024
MB = 1024 * KB

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS, "w": 7 * DAYS}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": KB, "kb": KB, "kib": KB, "m": MB, "mb": MB, "mib": MB,
               "g": 1024 * MB, "gb": 1024 * MB, "gib": 1024 * MB}


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``"30s"``, ``"15m"``, ``"24h"``, ``"2d"``; ValueError otherwise.

    A bare number means seconds, because that is what every other mail tool assumes.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 15m, 24h, 2d)")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 15m, 24h, 2d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"100KB"``, ``"32MB"`` (binary multiples); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use e.g. 100KB, 32MB)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size (use e.g. 100KB, 32MB)")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
