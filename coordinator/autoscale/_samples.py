"""Sample methods of reference §5.7 on series variables ($CPUPercent, $ActiveTasks, ...)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from ._values import Interval, OpError, T, Timestamp, Value, Vec, format_double

_TIME = (T.INTERVAL, T.TIMESTAMP)
_OPEN = (T.UNKNOWN, T.NEVER)


class InsufficientData(OpError):
    """Fewer samples than a samplePercent argument demands (code InsufficientSampleData)."""


def check(method: str, types: Sequence[T]) -> T | str:
    """Static result type of ``$X.method(args)``, or an error message."""
    n = len(types)
    if method in ("GetSamplePeriod", "Count", "HistoryBeginTime"):
        if n:
            return f"{method}() takes no arguments, got {n}"
        return {"GetSamplePeriod": T.INTERVAL, "Count": T.DOUBLE}.get(method, T.TIMESTAMP)
    if method == "GetSamplePercent":
        if not 1 <= n <= 2:
            return f"GetSamplePercent() takes a start and an optional end time, got {n} arguments"
        for i, t in enumerate(types, 1):
            if t not in _TIME and t not in _OPEN:
                return f"argument {i} of GetSamplePercent() must be a timeinterval or timestamp"
        return T.DOUBLE
    # GetSample(count) | GetSample(start [, percent]) | GetSample(start, end [, percent])
    if not 1 <= n <= 3:
        return f"GetSample() takes 1 to 3 arguments, got {n}"
    first = types[0]
    if first is T.DOUBLE:
        return T.VEC if n == 1 else "GetSample(count) takes a single argument"
    if first not in _TIME and first not in _OPEN:
        return "argument 1 of GetSample() must be a sample count, timeinterval or timestamp"
    if n >= 2 and types[1] not in (T.DOUBLE, *_TIME, *_OPEN):
        return "argument 2 of GetSample() must be an end time or a sample percentage"
    if n == 3:
        if types[1] is T.DOUBLE:
            return "GetSample(start, percent) takes no third argument"
        if types[2] not in (T.DOUBLE, *_OPEN):
            return "argument 3 of GetSample() must be a sample percentage (double)"
    return T.VEC


@dataclass(frozen=True, slots=True)
class History:
    spelling: str  # as written in the formula, for messages
    times: tuple[int, ...]  # ticks, ascending, none after "now"
    values: tuple[float, ...]
    period: int  # ticks between samples


def _instant(v: Value, now: int, what: str) -> int:
    if isinstance(v, Interval):
        return now - v.ticks  # a look-back offset
    if isinstance(v, Timestamp):
        return v.ticks
    raise OpError(f"{what} must be a timeinterval or timestamp")


def _window(h: History, args: Sequence[Value], now: int) -> tuple[int, int, int, int]:
    """(first index, end index, present, expected) for the window (lo, hi]."""
    a = _instant(args[0], now, "the start time")
    b = _instant(args[1], now, "the end time") if len(args) > 1 else now
    lo, hi = min(a, b), max(a, b)
    i = bisect.bisect_right(h.times, lo)
    j = bisect.bisect_right(h.times, hi)
    return i, j, j - i, (hi - lo) // h.period


def _percent(present: int, expected: int) -> float:
    return 100.0 if expected <= 0 else min(100.0, 100.0 * present / expected)


def _percent_arg(v: Value) -> float:
    if not isinstance(v, float):
        raise OpError("the sample percentage must be a double")
    if not 0 <= v <= 100:
        raise OpError(f"the sample percentage must be between 0 and 100, got {format_double(v)}")
    return v


def run(method: str, h: History, args: Sequence[Value], now: int) -> Value:
    if method == "Count":
        return float(len(h.times))
    if method == "GetSamplePeriod":
        return Interval(h.period)
    if method == "HistoryBeginTime":
        if not h.times:
            raise InsufficientData(f"no samples in the history of {h.spelling}")
        return Timestamp(h.times[0])
    if method == "GetSamplePercent":
        _, _, present, expected = _window(h, args, now)
        return _percent(present, expected)
    first = args[0]
    if isinstance(first, float):
        if len(args) != 1:
            raise OpError("GetSample(count) takes a single argument")
        if not first >= 1:
            raise OpError(f"the sample count must be at least 1, got {format_double(first)}")
        count = int(min(first, len(h.values)))
        return Vec(h.values[len(h.values) - count :])  # fewer if the history is shorter
    wanted: float | None = None
    window_args: Sequence[Value] = args
    if len(args) >= 2 and isinstance(args[-1], float):
        wanted, window_args = _percent_arg(args[-1]), args[:-1]
    elif len(args) == 3:
        raise OpError("argument 3 of GetSample() must be a sample percentage")
    i, j, present, expected = _window(h, window_args, now)
    got = _percent(present, expected)
    if wanted is not None and got < wanted:
        raise InsufficientData(
            f"Insufficient data from data set: {h.spelling} wanted {format_double(wanted)}%, "
            f"received {format_double(round(got, 2))}%"
        )
    return Vec(h.values[i:j])
