"""time("...") argument parsing: W3C-DTF (ISO 8601 profile) and RFC 1123."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from ._values import OpError, Timestamp, timestamp_from_datetime

_W3C = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:[Tt](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|z|[+-]\d{2}:\d{2})?)?)?)?"
)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_RFC1123 = re.compile(
    r"(?:(?:mon|tue|wed|thu|fri|sat|sun)\s*,\s*)?(\d{1,2})\s+([a-z]{3})\s+(\d{4})\s+"
    r"(\d{2}):(\d{2})(?::(\d{2}))?\s+(gmt|utc|ut|z|[+-]\d{4})",
    re.IGNORECASE,
)


def _offset(text: str) -> timedelta:
    if text.upper() in ("Z", "GMT", "UTC", "UT"):
        return timedelta(0)
    digits = text[1:].replace(":", "")
    delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return -delta if text[0] == "-" else delta


def parse_time(text: str) -> Timestamp:
    """Parse a W3C-DTF or RFC 1123 date-time; a missing zone means UTC (a choice)."""
    s = text.strip()
    try:
        m = _W3C.fullmatch(s)
        if m:
            year, month, day, hour, minute, sec, frac, zone = m.groups()
            micro = int((frac or "0")[:6].ljust(6, "0"))
            dt = datetime(
                int(year),
                int(month or 1),
                int(day or 1),
                int(hour or 0),
                int(minute or 0),
                int(sec or 0),
                micro,
                tzinfo=UTC,
            )
            return timestamp_from_datetime(dt - _offset(zone or "Z"))
        m = _RFC1123.fullmatch(s)
        if m and m.group(2).lower() in _MONTHS:
            day, mon, year, hour, minute, sec, zone = m.groups()
            dt = datetime(
                int(year),
                _MONTHS.index(mon.lower()) + 1,
                int(day),
                int(hour),
                int(minute),
                int(sec or 0),
                tzinfo=UTC,
            )
            return timestamp_from_datetime(dt - _offset(zone))
    except (ValueError, OverflowError) as exc:
        raise OpError(f"invalid date-time {text!r}: {exc}") from None
    raise OpError(
        f"invalid date-time {text!r}: expected W3C-DTF (2014-10-06T10:20:00Z) "
        "or RFC 1123 (Mon, 06 Oct 2014 10:20:00 GMT)"
    )
