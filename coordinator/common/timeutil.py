"""ISO 8601 durations and RFC 3339 timestamps, as the REST API spells them."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from .errors import bad_request, quoted

_DURATION = re.compile(
    r"^P(?!$)(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?=\d)(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
# .NET TimeSpan.MaxValue: what Azure Batch returns for "unlimited".
UNLIMITED = "P10675199DT2H48M5.4775807S"
UNLIMITED_S = 10675199 * 86400 + 2 * 3600 + 48 * 60 + 5.4775807


def parse_duration(text: str, field: str) -> float:
    """Seconds in an ISO 8601 duration (days, hours, minutes, seconds); 400 naming `field` if bad."""
    if not isinstance(text, str):
        raise bad_request(
            "InvalidPropertyValue", f"{field} must be an ISO 8601 duration string", field=field
        )
    t = text.strip().upper()
    if t.startswith("-"):
        raise bad_request(
            "InvalidPropertyValue", f"{field} must not be negative: {quoted(text)}", field=field
        )
    if t == UNLIMITED:
        return UNLIMITED_S
    m = _DURATION.match(t)
    if not m:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} is not an ISO 8601 duration (like PT1H30M): {quoted(text)}",
            field=field,
        )
    seconds = (
        float(m["d"] or 0) * 86400
        + float(m["h"] or 0) * 3600
        + float(m["m"] or 0) * 60
        + float(m["s"] or 0)
    )
    if seconds > UNLIMITED_S:  # what .NET and the Azure clients cannot hold either
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} is longer than the longest duration ({UNLIMITED}, unlimited): {quoted(text)}",
            field=field,
        )
    return seconds


def format_duration(seconds: float) -> str:
    if seconds >= UNLIMITED_S:
        return UNLIMITED
    if not seconds > 0:  # zero, and never a negative or NaN one in a view
        return "PT0S"
    whole = int(seconds)
    frac = seconds - whole
    d, rem = divmod(whole, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    out = "P"
    if d:
        out += f"{d}D"
    if h or m or s or frac or not d:
        out += "T"
        if h:
            out += f"{h}H"
        if m:
            out += f"{m}M"
        if s or frac or (not h and not m):
            # Fixed notation, at most 7 fractional digits like .NET: `:g` would write 1e-05.
            out += f"{s + frac:.7f}".rstrip("0").rstrip(".") + "S"
    return out


# The range a view can show (.NET's DateTime.MinValue/MaxValue): a time computed from long
# durations (a next run an unlimited interval away) is shown as the last one, not refused.
_LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, UTC).timestamp()
_EARLIEST = datetime(1, 1, 1, tzinfo=UTC).timestamp()


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    if not ts < _LATEST:  # nan too
        return "9999-12-31T23:59:59.999999Z"
    if ts < _EARLIEST:
        return "0001-01-01T00:00:00.000000Z"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str, field: str) -> float:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise bad_request(
            "InvalidPropertyValue", f"{field} is not an RFC 3339 time: {quoted(text)}", field=field
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
