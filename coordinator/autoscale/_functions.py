"""Built-in functions of reference §5.5: static signatures and implementations."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from ._timeparse import parse_time
from ._values import OpError, T, Timestamp, Value, Vec

_NUMERIC = (T.DOUBLE, T.VEC)
_OPEN = (T.UNKNOWN, T.NEVER)


class Stop(Exception):
    """Raised by stop(): ends the evaluation, keeping what was assigned so far."""


def _list_check(name: str, types: Sequence[T], minimum: int) -> str | None:
    if len(types) < minimum:
        return f"{name}() needs at least one value"
    for i, t in enumerate(types, 1):
        if t not in _NUMERIC and t not in _OPEN:
            return f"argument {i} of {name}() must be a double or doubleVec, not {t.value}"
    return None


def check(name: str, types: Sequence[T]) -> T | str:
    """Result type of a call, or an error message. ``name`` is lower-case."""
    n = len(types)
    if name in ("avg", "max", "min", "range", "std"):
        return _list_check(name, types, 1) or T.DOUBLE
    if name in ("len", "norm", "sum"):
        return _list_check(name, types, 0) or T.DOUBLE
    if name == "vec":
        return _list_check(name, types, 0) or T.VEC
    if name in ("lg", "ln", "log"):
        err = _list_check(name, types, 1)
        if err:
            return err
        if n == 1 and types[0] in (T.DOUBLE, T.UNKNOWN):
            return types[0]  # the scalar form, unless given a vector (reference §5.5)
        return T.VEC
    if name in ("percentile", "val"):
        if n != 2:
            return f"{name}() takes 2 arguments (a doubleVec and a double), got {n}"
        if types[0] not in _NUMERIC and types[0] not in _OPEN:
            return f"argument 1 of {name}() must be a doubleVec, not {types[0].value}"
        if types[1] not in (T.DOUBLE, *_OPEN):
            return f"argument 2 of {name}() must be a double, not {types[1].value}"
        return T.DOUBLE
    if name in ("rand", "stop"):
        if n:
            return f"{name}() takes no arguments, got {n}"
        return T.DOUBLE if name == "rand" else T.NEVER
    if name == "time":
        if n > 1:
            return f"time() takes at most one argument, got {n}"
        if n == 1 and types[0] not in (T.STRING, *_OPEN):
            return f"the argument of time() must be a string, not {types[0].value}"
        return T.TIMESTAMP
    return f"unknown function '{name}'"


KNOWN = (
    "avg",
    "len",
    "lg",
    "ln",
    "log",
    "max",
    "min",
    "norm",
    "percentile",
    "rand",
    "range",
    "std",
    "stop",
    "sum",
    "time",
    "val",
    "vec",
)


def flatten(name: str, args: Sequence[Value]) -> list[float]:
    out: list[float] = []
    for i, a in enumerate(args, 1):
        if isinstance(a, float):
            out.append(a)
        elif isinstance(a, Vec):
            out.extend(a.items)
        else:
            raise OpError(f"argument {i} of {name}() must be a double or doubleVec")
    return out


def _nonempty(name: str, xs: list[float]) -> list[float]:
    if not xs:
        raise OpError(f"{name}() of an empty list of values")
    return xs


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        raise OpError(f"std() needs at least 2 values (sample standard deviation), got {len(xs)}")
    mean = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _logger(base: Callable[[float], float], name: str) -> Callable[[float], float]:
    def run(x: float) -> float:
        if x <= 0:
            raise OpError(f"{name}() of a non-positive value ({x:g})")
        return base(x)

    return run


_LOGS = {
    "lg": _logger(math.log2, "lg"),
    "ln": _logger(math.log, "ln"),
    "log": _logger(math.log10, "log"),
}

_REDUCE: dict[str, Callable[[list[float]], float]] = {
    "avg": lambda xs: math.fsum(_nonempty("avg", xs)) / len(xs),
    "len": lambda xs: float(len(xs)),
    "max": lambda xs: max(_nonempty("max", xs)),
    "min": lambda xs: min(_nonempty("min", xs)),
    "norm": lambda xs: math.sqrt(math.fsum(x * x for x in xs)),
    "range": lambda xs: max(_nonempty("range", xs)) - min(xs),
    "std": _std,
    "sum": lambda xs: math.fsum(xs),
}


def _vector_arg(name: str, v: Value) -> list[float]:
    if isinstance(v, float):
        return [v]
    if isinstance(v, Vec):
        return list(v.items)
    raise OpError(f"argument 1 of {name}() must be a doubleVec")


def _double_arg(name: str, v: Value) -> float:
    if not isinstance(v, float):
        raise OpError(f"argument 2 of {name}() must be a double")
    return v


def _percentile(v: Value, p: Value) -> float:
    xs = sorted(_nonempty("percentile", _vector_arg("percentile", v)))
    q = _double_arg("percentile", p)
    if not 0 <= q <= 100:
        raise OpError(f"percentile must be between 0 and 100, got {q:g}")
    rank = max(1, math.ceil(q / 100 * len(xs)))  # nearest-rank method
    return xs[rank - 1]


def _val(v: Value, i: Value) -> float:
    xs = _vector_arg("val", v)
    idx = _double_arg("val", i)
    if idx != int(idx) or not 0 <= idx < len(xs):
        raise OpError(f"index {idx:g} out of range for a vector of {len(xs)} values")
    return xs[int(idx)]


def call(name: str, args: Sequence[Value], now: Timestamp, rng: random.Random) -> Value:
    if name in _REDUCE:
        return _REDUCE[name](flatten(name, args))
    if name == "vec":
        return Vec(tuple(flatten(name, args)))
    if name in _LOGS:
        f = _LOGS[name]
        if len(args) == 1 and isinstance(args[0], float):
            return f(args[0])
        return Vec(tuple(f(x) for x in flatten(name, args)))
    if name == "percentile":
        return _percentile(*args)
    if name == "val":
        return _val(*args)
    if name == "rand":
        return rng.random()
    if name == "stop":
        raise Stop
    if name == "time":
        if not args or args[0] == "":
            return now
        if not isinstance(args[0], str):
            raise OpError("the argument of time() must be a string")
        return parse_time(args[0])
    raise OpError(f"unknown function '{name}'")  # parse() rejects these already
