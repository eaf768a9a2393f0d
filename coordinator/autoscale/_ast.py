"""Syntax tree. Every node carries the 1-based line and column where it starts."""

from __future__ import annotations

from dataclasses import dataclass

from ._names import Kind


@dataclass(frozen=True, slots=True)
class Num:
    value: float
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Str:
    value: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Name:
    spelling: str  # as written, e.g. "$TargetDedicated"
    kind: Kind
    key: str  # lookup key: lower-cased spelling, or canonical service name
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Unary:
    op: str
    operand: Expr
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # arithmetic, comparison, "&&" or "||"
    left: Expr
    right: Expr
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Ternary:
    cond: Expr
    then: Expr
    otherwise: Expr
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Call:
    func: str  # lower-cased function name
    args: tuple[Expr, ...]
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Method:
    series: Name  # always a Kind.SERIES name
    method: str  # canonical method name, e.g. "GetSample"
    args: tuple[Expr, ...]
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Member:
    target: Expr
    member: str  # lower-cased timestamp member
    line: int
    column: int


Expr = Num | Str | Name | Unary | Binary | Ternary | Call | Method | Member


@dataclass(frozen=True, slots=True)
class Assign:
    target: Name
    value: Expr
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class ExprStmt:
    expr: Expr
    line: int
    column: int


Statement = Assign | ExprStmt
