"""Run-time values, the operator table (shared by the checker and the evaluator), formatting."""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ._names import TICKS_PER_SECOND


class T(enum.Enum):
    DOUBLE = "double"
    VEC = "doubleVec"
    STRING = "string"
    TIMESTAMP = "timestamp"
    INTERVAL = "timeinterval"
    OPTION = "deallocation option"
    SERIES = "sample variable"
    NEVER = "stop()"  # the type of stop(): evaluation never continues past it
    UNKNOWN = "unknown"  # static analysis could not tell (e.g. ternary with mixed branches)


class OpError(Exception):
    """A value-level failure; the evaluator adds the position."""


@dataclass(frozen=True, slots=True)
class Vec:
    items: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Interval:
    ticks: int  # 100 ns units, like a .NET TimeSpan


@dataclass(frozen=True, slots=True)
class Timestamp:
    ticks: int  # 100 ns units since 1970-01-01T00:00:00Z


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # requeue | terminate | taskcompletion | retaineddata


Value = float | Vec | str | Interval | Timestamp | Option

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_TS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1) * 10
_MAX_TS = (
    (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - _EPOCH)
    // timedelta(microseconds=1)
    * 10
)
_MAX_INTERVAL = 2**63 - 1  # TimeSpan.MaxValue


def type_of(v: Value) -> T:
    if isinstance(v, float):
        return T.DOUBLE
    if isinstance(v, Vec):
        return T.VEC
    if isinstance(v, str):
        return T.STRING
    if isinstance(v, Interval):
        return T.INTERVAL
    if isinstance(v, Timestamp):
        return T.TIMESTAMP
    return T.OPTION


def number(x: float) -> float:
    if not math.isfinite(x):
        raise OpError("the result is not a finite number")
    return x


def interval(ticks: float) -> Interval:
    if not math.isfinite(ticks) or abs(ticks) > _MAX_INTERVAL:
        raise OpError("time interval out of range")
    return Interval(round(ticks))


def timestamp(ticks: int) -> Timestamp:
    if not _MIN_TS <= ticks <= _MAX_TS:
        raise OpError("timestamp out of range (years 1 to 9999)")
    return Timestamp(ticks)


def timestamp_from_datetime(dt: datetime) -> Timestamp:
    return timestamp((dt - _EPOCH) // timedelta(microseconds=1) * 10)


def to_datetime(ts: Timestamp) -> datetime:
    return _EPOCH + timedelta(microseconds=ts.ticks // 10)


def _div(a: float, b: float) -> float:
    if b == 0:
        raise OpError("division by zero")
    return a / b


_ARITH: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": _div,
}
# Operands are two doubles, two strings or two tick counts: the table below only pairs like with like.
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    ">=": operator.ge,
    ">": operator.gt,
    "!=": operator.ne,
}

BinFn = Callable[[Value, Value], Value]
# (operator, left type, right type) -> (result type, implementation); reference §5.4 plus the
# documented extensions: double op doubleVec (component-wise) and timestamp - timeinterval.
BINARY: dict[tuple[str, T, T], tuple[T, BinFn]] = {}


# The evaluator picks an implementation by the operands' types (`type_of`), so these only narrow
# what the table's key already guarantees.
def _dbl(v: Value) -> float:
    assert isinstance(v, float | int)
    return v


def _vec(v: Value) -> Vec:
    assert isinstance(v, Vec)
    return v


def _str(v: Value) -> str:
    assert isinstance(v, str)
    return v


def _ticks(v: Value) -> int:
    assert isinstance(v, Interval | Timestamp)
    return v.ticks


def _vec_vec(f: Callable[[float, float], float]) -> BinFn:
    def run(a: Value, b: Value) -> Value:
        av, bv = _vec(a), _vec(b)
        if len(av.items) != len(bv.items):
            raise OpError(f"vectors of different lengths ({len(av.items)} and {len(bv.items)})")
        return Vec(tuple(number(f(x, y)) for x, y in zip(av.items, bv.items, strict=True)))

    return run


def _dbl_dbl(f: Callable[[float, float], float]) -> BinFn:
    return lambda a, b: number(f(_dbl(a), _dbl(b)))


def _vec_dbl(f: Callable[[float, float], float]) -> BinFn:
    return lambda a, b: Vec(tuple(number(f(x, _dbl(b))) for x in _vec(a).items))


def _dbl_vec(f: Callable[[float, float], float]) -> BinFn:
    return lambda a, b: Vec(tuple(number(f(_dbl(a), y)) for y in _vec(b).items))


def _compare(f: Callable[[Any, Any], bool], operand: Callable[[Value], object]) -> BinFn:
    return lambda a, b: float(f(operand(a), operand(b)))


def _register() -> None:
    for op, f in _ARITH.items():
        BINARY[op, T.DOUBLE, T.DOUBLE] = (T.DOUBLE, _dbl_dbl(f))
        BINARY[op, T.VEC, T.DOUBLE] = (T.VEC, _vec_dbl(f))
        BINARY[op, T.DOUBLE, T.VEC] = (T.VEC, _dbl_vec(f))
        BINARY[op, T.VEC, T.VEC] = (T.VEC, _vec_vec(f))
    BINARY["*", T.DOUBLE, T.INTERVAL] = (T.INTERVAL, lambda a, b: interval(_dbl(a) * _ticks(b)))
    BINARY["*", T.INTERVAL, T.DOUBLE] = (T.INTERVAL, lambda a, b: interval(_ticks(a) * _dbl(b)))
    BINARY["/", T.INTERVAL, T.DOUBLE] = (
        T.INTERVAL,
        lambda a, b: interval(_div(_ticks(a), _dbl(b))),
    )
    BINARY["+", T.INTERVAL, T.INTERVAL] = (
        T.INTERVAL,
        lambda a, b: interval(_ticks(a) + _ticks(b)),
    )
    BINARY["-", T.INTERVAL, T.INTERVAL] = (
        T.INTERVAL,
        lambda a, b: interval(_ticks(a) - _ticks(b)),
    )
    BINARY["+", T.INTERVAL, T.TIMESTAMP] = (
        T.TIMESTAMP,
        lambda a, b: timestamp(_ticks(a) + _ticks(b)),
    )
    BINARY["+", T.TIMESTAMP, T.INTERVAL] = (
        T.TIMESTAMP,
        lambda a, b: timestamp(_ticks(a) + _ticks(b)),
    )
    BINARY["-", T.TIMESTAMP, T.INTERVAL] = (
        T.TIMESTAMP,
        lambda a, b: timestamp(_ticks(a) - _ticks(b)),
    )
    BINARY["-", T.TIMESTAMP, T.TIMESTAMP] = (
        T.INTERVAL,
        lambda a, b: interval(_ticks(a) - _ticks(b)),
    )
    for op, g in _COMPARE.items():
        BINARY[op, T.DOUBLE, T.DOUBLE] = (T.DOUBLE, _compare(g, _dbl))
        BINARY[op, T.STRING, T.STRING] = (T.DOUBLE, _compare(g, _str))
        for t in (T.TIMESTAMP, T.INTERVAL):
            BINARY[op, t, t] = (T.DOUBLE, _compare(g, _ticks))
    # the evaluator short-circuits these; the entries give their types
    BINARY["&&", T.DOUBLE, T.DOUBLE] = (
        T.DOUBLE,
        lambda a, b: float(_dbl(a) != 0 and _dbl(b) != 0),
    )
    BINARY["||", T.DOUBLE, T.DOUBLE] = (
        T.DOUBLE,
        lambda a, b: float(_dbl(a) != 0 or _dbl(b) != 0),
    )


_register()

UNARY: dict[tuple[str, T], tuple[T, Callable[[Value], Value]]] = {
    ("-", T.DOUBLE): (T.DOUBLE, lambda a: -_dbl(a)),
    ("!", T.DOUBLE): (T.DOUBLE, lambda a: float(_dbl(a) == 0)),
    ("-", T.INTERVAL): (T.INTERVAL, lambda a: interval(-_ticks(a))),
}


def binary_type(op: str, left: T, right: T) -> T | None:
    """Static result type; None when the combination is definitely invalid."""
    if T.NEVER in (left, right):
        return T.NEVER
    if T.UNKNOWN in (left, right):
        return T.UNKNOWN
    entry = BINARY.get((op, left, right))
    return entry[0] if entry else None


def unary_type(op: str, operand: T) -> T | None:
    if operand in (T.NEVER, T.UNKNOWN):
        return operand
    entry = UNARY.get((op, operand))
    return entry[0] if entry else None


# ---- formatting for the results string (reference §5.8; vector/interval format is our choice)


def format_double(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x).replace("e", "E")


def format_interval(iv: Interval) -> str:
    """.NET TimeSpan "c" format: [-][d.]hh:mm:ss[.fffffff]."""
    sign = "-" if iv.ticks < 0 else ""
    rest, frac = divmod(abs(iv.ticks), TICKS_PER_SECOND)
    rest, sec = divmod(rest, 60)
    rest, minute = divmod(rest, 60)
    days, hour = divmod(rest, 24)
    out = f"{sign}{f'{days}.' if days else ''}{hour:02d}:{minute:02d}:{sec:02d}"
    return out + (f".{frac:07d}" if frac else "")


def format_timestamp(ts: Timestamp) -> str:
    dt = to_datetime(ts)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond // 1000:03d}Z"


def format_value(v: Value) -> str:
    if isinstance(v, float):
        return format_double(v)
    if isinstance(v, Vec):
        return "[" + ",".join(format_double(x) for x in v.items) + "]"
    if isinstance(v, Interval):
        return format_interval(v)
    if isinstance(v, Timestamp):
        return format_timestamp(v)
    if isinstance(v, Option):
        return v.name
    return v
