"""Evaluation of a parsed formula against one set of inputs (reference §5.6-5.8)."""

from __future__ import annotations

import math
import random
from datetime import timedelta

from . import _functions, _samples
from ._ast import (
    Assign,
    Binary,
    Call,
    Expr,
    ExprStmt,
    Member,
    Method,
    Name,
    Num,
    Statement,
    Str,
    Ternary,
    Unary,
)
from ._errors import EVALUATION_ERROR, INSUFFICIENT_SAMPLE_DATA, EvalError
from ._inputs import AutoscaleInputs, AutoscaleResult
from ._names import (
    DEALLOCATION,
    DEALLOCATION_OPTIONS,
    DEDICATED,
    INTERVALS,
    LOW_PRIORITY,
    READ_WRITE,
    Kind,
)
from ._parser import Program
from ._values import (
    BINARY,
    UNARY,
    Interval,
    OpError,
    Option,
    Timestamp,
    Value,
    format_value,
    timestamp_from_datetime,
    to_datetime,
    type_of,
)

_MAX_TARGET = 2**31 - 1
Slot = tuple[str, bool]  # (canonical read-write variable, is legacy alias)


def _fail(node: Expr | Statement, text: str) -> EvalError:
    return EvalError(text, node.line, node.column)


class _Evaluator:
    def __init__(self, program: Program, inputs: AutoscaleInputs) -> None:
        self.program = program
        self.inputs = inputs
        self.now = timestamp_from_datetime(inputs.now)
        self.rng = random.Random(inputs.random_seed)
        self.user: dict[str, Value] = {}
        self.user_spelling: dict[str, str] = {}
        initial: dict[str, Value] = {
            DEDICATED: float(inputs.target_dedicated),
            LOW_PRIORITY: float(inputs.target_low_priority),
            DEALLOCATION: Option(inputs.deallocation_option),
        }
        self.rw: dict[Slot, Value] = {(c, a): v for c, v in initial.items() for a in (False, True)}
        self.assigned: set[Slot] = set()
        self.scalars = {
            "CurrentDedicatedNodes": float(inputs.current_dedicated),
            "CurrentLowPriorityNodes": float(inputs.current_low_priority),
            "TaskSlotsPerNode": float(inputs.task_slots_per_node),
            "UsableNodeCount": float(inputs.usable_node_count),
        }
        self.histories: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {}
        self.period = inputs.sample_period // timedelta(microseconds=1) * 10

    # -- statements
    def run(self) -> None:
        try:
            for stmt in self.program.statements:
                self.statement(stmt)
        except _functions.Stop:
            pass  # stop(): what was assigned so far stands

    def statement(self, stmt: Statement) -> None:
        if isinstance(stmt, ExprStmt):
            e = stmt.expr
            if isinstance(e, Name) and e.kind in (Kind.USER, Kind.SERIES):
                return  # a bare identifier is tolerated, assigned or not (reference §5.8)
            self.eval(e)
            return
        assert isinstance(stmt, Assign)
        value = self.eval(stmt.value)
        target = stmt.target
        if target.kind is Kind.USER:
            self.user[target.key] = value
            self.user_spelling.setdefault(target.key, target.spelling)
            return
        slot = READ_WRITE[target.key]
        if slot[0] == DEALLOCATION:
            if isinstance(value, str) and value.lower() in DEALLOCATION_OPTIONS:
                value = Option(value.lower())
            if not isinstance(value, Option):
                raise _fail(
                    stmt.value,
                    f"{target.spelling} must be one of "
                    f"{', '.join(DEALLOCATION_OPTIONS)}, got {format_value(value)!r}",
                )
        elif not isinstance(value, float):
            raise _fail(
                stmt.value, f"{target.spelling} must be a number, not a {type_of(value).value}"
            )
        elif not math.isfinite(value):  # NaN from samples (avg of NaN): never a count
            raise _fail(stmt.value, f"{target.spelling} is not a finite number")
        elif value > _MAX_TARGET:
            raise _fail(
                stmt.value,
                f"{target.spelling}={format_value(value)} is too large (at most {_MAX_TARGET})",
            )
        self.rw[slot] = value
        self.assigned.add(slot)

    # -- expressions
    def eval(self, e: Expr) -> Value:
        if isinstance(e, Num | Str):
            return e.value
        if isinstance(e, Name):
            return self.name(e)
        try:
            if isinstance(e, Binary):
                return self.binary(e)
            if isinstance(e, Unary):
                v = self.eval(e.operand)
                entry = UNARY.get((e.op, type_of(v)))
                if entry is None:
                    raise OpError(f"operator '{e.op}' cannot be applied to a {type_of(v).value}")
                return entry[1](v)
            if isinstance(e, Ternary):
                return self.eval(e.then if self.truth(e.cond) else e.otherwise)
            if isinstance(e, Call):
                args = [self.eval(a) for a in e.args]
                return _functions.call(e.func, args, self.now, self.rng)
            if isinstance(e, Method):
                return self.method(e)
            assert isinstance(e, Member)
            return self.member(e)
        except _samples.InsufficientData as exc:
            raise EvalError(str(exc), e.line, e.column, INSUFFICIENT_SAMPLE_DATA) from None
        except OpError as exc:
            raise _fail(e, str(exc)) from None

    def truth(self, e: Expr) -> bool:
        v = self.eval(e)
        if not isinstance(v, float):
            raise _fail(e, f"a condition must be a double, not a {type_of(v).value}")
        return v != 0

    def binary(self, e: Binary) -> Value:
        if e.op in ("&&", "||"):  # short-circuit, as in C
            left = self.truth(e.left)
            if left == (e.op == "||"):
                return float(left)
            return float(self.truth(e.right))
        a, b = self.eval(e.left), self.eval(e.right)
        entry = BINARY.get((e.op, type_of(a), type_of(b)))
        if entry is None:
            raise OpError(
                f"operator '{e.op}' cannot combine a {type_of(a).value} and a {type_of(b).value}"
            )
        return entry[1](a, b)

    def name(self, e: Name) -> Value:
        if e.kind is Kind.USER:
            if e.key not in self.user:
                raise _fail(e, f"variable '{e.spelling}' is read before it is assigned")
            return self.user[e.key]
        if e.kind is Kind.READ_WRITE:
            return self.rw[READ_WRITE[e.key]]
        if e.kind is Kind.SCALAR:
            return self.scalars[e.key]
        if e.kind is Kind.INTERVAL:
            return Interval(INTERVALS[e.key])
        if e.kind is Kind.OPTION:
            return Option(e.key)
        raise _fail(
            e, f"{e.spelling} holds samples, not a value: use a method such as .GetSample(...)"
        )

    def method(self, e: Method) -> Value:
        canonical = e.series.key
        if canonical not in self.histories:
            visible = sorted(
                (timestamp_from_datetime(s.timestamp).ticks, float(s.value))
                for s in self.inputs.series.get(canonical, ())
            )
            visible = [(t, v) for t, v in visible if t <= self.now.ticks]
            self.histories[canonical] = (tuple(t for t, _ in visible), tuple(v for _, v in visible))
        times, values = self.histories[canonical]
        history = _samples.History(e.series.spelling, times, values, self.period)
        args = [self.eval(a) for a in e.args]
        return _samples.run(e.method, history, args, self.now.ticks)

    def member(self, e: Member) -> Value:
        v = self.eval(e.target)
        if not isinstance(v, Timestamp):
            raise OpError(f"'.{e.member}' needs a timestamp, not a {type_of(v).value}")
        dt = to_datetime(v)
        return float(dt.isoweekday() if e.member == "weekday" else getattr(dt, e.member))

    # -- results
    def result(self) -> AutoscaleResult:
        spellings = dict(self.program.rw_spellings)
        parts: list[str] = []
        targets: dict[str, Value | None] = {}
        for canonical in (DEDICATED, LOW_PRIORITY, DEALLOCATION):
            full, alias = (canonical, False), (canonical, True)
            won = next((s for s in (full, alias) if s in self.assigned), None)
            targets[canonical] = self.rw[won] if won else None
            if canonical == LOW_PRIORITY and not (
                self.inputs.report_low_priority or full in spellings or alias in spellings
            ):
                continue
            shown = won or (alias if alias in spellings and full not in spellings else full)
            parts.append(f"{spellings.get(shown, '$' + canonical)}={format_value(self.rw[shown])}")
        for key in sorted(self.user):
            parts.append(f"{self.user_spelling[key]}={format_value(self.user[key])}")
        option = targets[DEALLOCATION]
        return AutoscaleResult(
            results=";".join(parts),
            target_dedicated=_count(targets[DEDICATED]),
            target_low_priority=_count(targets[LOW_PRIORITY]),
            deallocation_option=option.name if isinstance(option, Option) else None,
        )


def _count(v: Value | None) -> int | None:
    """Targets are counts: fractions truncate, negatives clamp to 0 (reference §5.8 choice)."""
    if not isinstance(v, float):
        return None
    return max(0, math.trunc(v))


def evaluate(program: Program, inputs: AutoscaleInputs) -> AutoscaleResult:
    """Run ``program``; run-time failures are reported in ``.error``, never raised."""
    ev = _Evaluator(program, inputs)
    try:
        ev.run()
        return ev.result()
    except EvalError as exc:
        return AutoscaleResult(results="", error=(exc.code, exc.message))
    except RecursionError:  # parse() bounds nesting, so this is only a safety net
        return AutoscaleResult(results="", error=(EVALUATION_ERROR, "the formula nests too deeply"))
