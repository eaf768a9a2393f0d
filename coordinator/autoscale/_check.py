"""Static type check: rejects at parse time what can never evaluate (reference §5.3-5.5).

Only definite errors are reported: where a type depends on run-time data (a ternary with
branches of different types, a variable not assigned yet) the type is UNKNOWN and passes.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _functions, _samples
from ._ast import (
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
from ._errors import SYNTAX_ERROR, FormulaError
from ._names import DEALLOCATION, DEALLOCATION_OPTIONS, READ_WRITE, Kind
from ._timeparse import parse_time
from ._values import OpError, T, binary_type, unary_type

_OPEN = (T.UNKNOWN, T.NEVER)


def _fail(node: Expr | Statement, text: str) -> FormulaError:
    return FormulaError(SYNTAX_ERROR, text, node.line, node.column)


class _Checker:
    def __init__(self) -> None:
        self.user: dict[str, T] = {}

    def statement(self, stmt: Statement) -> None:
        if isinstance(stmt, ExprStmt):
            if not isinstance(stmt.expr, Name):  # a bare identifier is tolerated (§5.8)
                self.typed(stmt.expr)
            return
        t = self.typed(stmt.value)
        target = stmt.target
        if target.kind is Kind.USER:
            if t is not T.NEVER:
                self.user[target.key] = t
            return
        canonical, _alias = READ_WRITE[target.key]
        if canonical == DEALLOCATION:
            if t not in (T.OPTION, T.STRING, *_OPEN):
                raise _fail(
                    stmt.value,
                    f"{target.spelling} must be one of "
                    f"{', '.join(DEALLOCATION_OPTIONS)}, not a {t.value}",
                )
            if isinstance(stmt.value, Str) and stmt.value.value.lower() not in DEALLOCATION_OPTIONS:
                raise _fail(
                    stmt.value,
                    f"{stmt.value.value!r} is not a deallocation option "
                    f"({', '.join(DEALLOCATION_OPTIONS)})",
                )
        elif t not in (T.DOUBLE, *_OPEN):
            raise _fail(stmt.value, f"{target.spelling} must be a number, not a {t.value}")

    def typed(self, e: Expr) -> T:
        """Type of a value-producing expression (a bare sample variable is not a value)."""
        t = self.expr(e)
        if t is T.SERIES:
            raise _fail(
                e,
                f"{e.spelling if isinstance(e, Name) else 'a sample variable'} holds "
                "samples, not a value: use a method such as .GetSample(...)",
            )
        return t

    def expr(self, e: Expr) -> T:
        if isinstance(e, Num):
            return T.DOUBLE
        if isinstance(e, Str):
            return T.STRING
        if isinstance(e, Name):
            return self.name(e)
        if isinstance(e, Unary):
            t = self.typed(e.operand)
            result = unary_type(e.op, t)
            if result is None:
                raise _fail(e, f"operator '{e.op}' cannot be applied to a {t.value}")
            return result
        if isinstance(e, Binary):
            lt, rt = self.typed(e.left), self.typed(e.right)
            result = binary_type(e.op, lt, rt)
            if result is None:
                raise _fail(e, f"operator '{e.op}' cannot combine a {lt.value} and a {rt.value}")
            return result
        if isinstance(e, Ternary):
            ct = self.typed(e.cond)
            if ct not in (T.DOUBLE, *_OPEN):
                raise _fail(e.cond, f"the condition of '?:' must be a double, not a {ct.value}")
            a, b = self.typed(e.then), self.typed(e.otherwise)
            if a is b or b is T.NEVER:
                return a
            return b if a is T.NEVER else T.UNKNOWN
        if isinstance(e, Call):
            return self.call(e)
        if isinstance(e, Method):
            return self.checked(e, _samples.check(e.method, self.arg_types(e.args)))
        assert isinstance(e, Member)
        t = self.typed(e.target)
        if t not in (T.TIMESTAMP, *_OPEN):
            raise _fail(e, f"'.{e.member}' needs a timestamp, not a {t.value}")
        return T.DOUBLE

    def call(self, e: Call) -> T:
        if e.func == "time" and len(e.args) == 1 and isinstance(e.args[0], Str):
            try:
                if e.args[0].value:
                    parse_time(e.args[0].value)
            except OpError as exc:
                raise _fail(e.args[0], str(exc)) from None
        return self.checked(e, _functions.check(e.func, self.arg_types(e.args)))

    def arg_types(self, args: Sequence[Expr]) -> list[T]:
        return [self.typed(a) for a in args]

    @staticmethod
    def checked(e: Expr, result: T | str) -> T:
        if isinstance(result, str):
            raise _fail(e, result)
        return result

    def name(self, e: Name) -> T:
        if e.kind is Kind.USER:
            return self.user.get(e.key, T.UNKNOWN)
        if e.kind is Kind.READ_WRITE:
            return T.OPTION if READ_WRITE[e.key][0] == DEALLOCATION else T.DOUBLE
        return {
            Kind.SCALAR: T.DOUBLE,
            Kind.SERIES: T.SERIES,
            Kind.INTERVAL: T.INTERVAL,
            Kind.OPTION: T.OPTION,
        }[e.kind]


def check_program(statements: Sequence[Statement]) -> None:
    checker = _Checker()
    for stmt in statements:
        checker.statement(stmt)
