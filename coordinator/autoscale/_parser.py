"""Recursive-descent parser for the grammar of reference §5.2."""

from __future__ import annotations

from dataclasses import dataclass

from . import _functions
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
from ._errors import MAX_FORMULA_LENGTH, MAX_STATEMENTS, SYNTAX_ERROR, TOO_LONG, FormulaError
from ._lexer import EOF, IDENT, NUMBER, OP, STRING, Token, tokenize
from ._names import READ_WRITE, SAMPLE_METHODS, TIMESTAMP_MEMBERS, Kind, classify

_COMPARISONS = ("<", "<=", "==", ">=", ">", "!=")
# Bounds that keep the recursive parser, checker and evaluator far from Python's recursion
# limit; published formulas nest a handful of levels.
MAX_NESTING = 40  # parentheses, arguments, ternaries, unary operators inside each other
MAX_DEPTH = 100  # depth of one statement's syntax tree (e.g. a chain a+b+c+...)


@dataclass(frozen=True, slots=True)
class Program:
    """A parsed, statically checked formula (immutable)."""

    text: str
    statements: tuple[Statement, ...]
    # (canonical read-write variable, is legacy alias) -> first spelling used in the formula
    rw_spellings: tuple[tuple[tuple[str, bool], str], ...]


def _fail(tok: Token | Expr | Statement, text: str) -> FormulaError:
    return FormulaError(SYNTAX_ERROR, text, tok.line, tok.column)


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.toks = tokens
        self.i = 0
        self.names: list[Name] = []
        self.nesting = 0

    # -- token helpers
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def at_op(self, *ops: str) -> bool:
        return self.tok.kind == OP and self.tok.text in ops

    def take(self) -> Token:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, op: str, context: str) -> Token:
        if not self.at_op(op):
            raise _fail(self.tok, f"expected '{op}' {context}, found {self.tok.describe()}")
        return self.take()

    # -- statements
    def formula(self) -> list[Statement]:
        stmts: list[Statement] = []
        while self.tok.kind != EOF:
            if self.at_op(";"):
                raise _fail(self.tok, "empty statement (two ';' in a row, or a leading ';')")
            if len(stmts) == MAX_STATEMENTS:
                raise _fail(self.tok, f"too many statements: at most {MAX_STATEMENTS} are allowed")
            stmts.append(self.statement())
            if self.at_op(";"):
                self.take()
            elif self.tok.kind != EOF:
                raise _fail(
                    self.tok, "expected ';' between statements, found " + self.tok.describe()
                )
        return stmts

    def statement(self) -> Statement:
        start = self.tok
        nxt = self.toks[self.i + 1]
        if start.kind == IDENT and nxt.kind == OP and nxt.text == "=":
            target = self.name(self.take())
            self.take()
            if target.kind not in (Kind.USER, Kind.READ_WRITE):
                raise _fail(
                    target,
                    f"cannot assign to {target.spelling}: it is read-only ({target.kind.value})",
                )
            return Assign(target, self.expr(), start.line, start.column)
        return ExprStmt(self.expr(), start.line, start.column)

    # -- expressions, lowest precedence first
    def nest(self) -> None:
        if self.nesting >= MAX_NESTING:
            raise _fail(self.tok, f"expression nested too deeply (more than {MAX_NESTING} levels)")

    def expr(self) -> Expr:
        self.nest()
        self.nesting += 1
        try:
            return self.ternary()
        finally:
            self.nesting -= 1

    def ternary(self) -> Expr:
        cond = self.logical("||")
        if not self.at_op("?"):
            return cond
        q = self.take()
        then = self.expr()
        self.expect(":", "in the conditional expression 'condition ? a : b'")
        return Ternary(cond, then, self.expr(), q.line, q.column)

    def logical(self, op: str) -> Expr:
        left = self.logical("&&") if op == "||" else self.compare()
        while self.at_op(op):
            tok = self.take()
            right = self.logical("&&") if op == "||" else self.compare()
            left = Binary(op, left, right, tok.line, tok.column)
        return left

    def compare(self) -> Expr:
        left = self.additive()
        if not self.at_op(*_COMPARISONS):
            return left
        tok = self.take()
        node = Binary(tok.text, left, self.additive(), tok.line, tok.column)
        if self.at_op(*_COMPARISONS):
            raise _fail(self.tok, "comparisons cannot be chained; use '&&' and parentheses")
        return node

    def additive(self) -> Expr:
        left = self.term()
        while self.at_op("+", "-"):
            tok = self.take()
            left = Binary(tok.text, left, self.term(), tok.line, tok.column)
        return left

    def term(self) -> Expr:
        left = self.unary()
        while self.at_op("*", "/"):
            tok = self.take()
            left = Binary(tok.text, left, self.unary(), tok.line, tok.column)
        return left

    def unary(self) -> Expr:
        if not self.at_op("-", "!"):
            return self.postfix()
        self.nest()
        tok = self.take()
        self.nesting += 1
        try:
            return Unary(tok.text, self.unary(), tok.line, tok.column)
        finally:
            self.nesting -= 1

    def postfix(self) -> Expr:
        node = self.primary()
        while self.at_op("."):
            self.take()
            tok = self.take()
            if tok.kind != IDENT or tok.text.startswith("$"):
                raise _fail(
                    tok, f"expected a member or method name after '.', found {tok.describe()}"
                )
            low = tok.text.lower()
            if low in SAMPLE_METHODS:
                if not (isinstance(node, Name) and node.kind is Kind.SERIES):
                    raise _fail(
                        tok,
                        f"{SAMPLE_METHODS[low]}() is a method of sample variables "
                        "such as $CPUPercent or $ActiveTasks",
                    )
                self.expect("(", f"after {SAMPLE_METHODS[low]} (it is a method)")
                node = Method(node, SAMPLE_METHODS[low], self.args(), tok.line, tok.column)
            elif low in TIMESTAMP_MEMBERS:
                if self.at_op("("):
                    raise _fail(self.tok, f"'{tok.text}' is a timestamp member, not a method")
                node = Member(node, low, tok.line, tok.column)
            else:
                raise _fail(
                    tok,
                    f"unknown member or method '{tok.text}' (timestamps have "
                    f"{', '.join(TIMESTAMP_MEMBERS)}; sample variables have "
                    f"{', '.join(SAMPLE_METHODS.values())})",
                )
        return node

    def args(self) -> tuple[Expr, ...]:
        out: list[Expr] = []
        if not self.at_op(")"):
            out.append(self.expr())
            while self.at_op(","):
                self.take()
                out.append(self.expr())
        self.expect(")", "to close the argument list")
        return tuple(out)

    def primary(self) -> Expr:
        tok = self.take()
        if tok.kind == NUMBER:
            return Num(float(tok.text), tok.line, tok.column)
        if tok.kind == STRING:
            return Str(tok.text, tok.line, tok.column)
        if tok.kind == IDENT:
            if self.at_op("("):
                low = tok.text.lower()
                if tok.text.startswith("$") or low not in _functions.KNOWN:
                    raise _fail(
                        tok,
                        f"unknown function '{tok.text}' (known: "
                        + ", ".join(_functions.KNOWN)
                        + ")",
                    )
                self.take()
                return Call(low, self.args(), tok.line, tok.column)
            return self.name(tok)
        if tok.kind == OP and tok.text == "(":
            inner = self.expr()
            self.expect(")", "to close '('")
            return inner
        raise _fail(tok, f"expected a value, found {tok.describe()}")

    def name(self, tok: Token) -> Name:
        kind, key = classify(tok.text)
        if kind is Kind.USER and key.startswith("timeinterval_"):
            raise _fail(tok, f"unknown time interval constant '{tok.text}'")
        node = Name(tok.text, kind, key, tok.line, tok.column)
        self.names.append(node)
        return node


def _children(node: Statement | Expr) -> tuple[Expr, ...]:
    if isinstance(node, Assign):
        return (node.value,)
    if isinstance(node, ExprStmt):
        return (node.expr,)
    if isinstance(node, Unary):
        return (node.operand,)
    if isinstance(node, Binary):
        return (node.left, node.right)
    if isinstance(node, Ternary):
        return (node.cond, node.then, node.otherwise)
    if isinstance(node, Call | Method):
        return node.args
    if isinstance(node, Member):
        return (node.target,)
    return ()


def _check_depth(stmt: Statement) -> None:
    stack: list[tuple[Statement | Expr, int]] = [(stmt, 1)]
    while stack:  # iterative: the tree may be too deep to walk recursively
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _fail(
                node,
                f"expression too complex (more than {MAX_DEPTH} nested operations "
                "in one statement); split it into several statements",
            )
        stack.extend((child, depth + 1) for child in _children(node))


def parse(text: str) -> Program:
    """Parse and statically check a formula; raises FormulaError with line and column."""
    from ._check import check_program  # late import: the checker needs Program's pieces only

    if not isinstance(text, str):
        raise FormulaError(SYNTAX_ERROR, "the formula must be a string")
    if len(text) > MAX_FORMULA_LENGTH:
        raise FormulaError(
            TOO_LONG,
            f"the formula is {len(text)} characters long; at most {MAX_FORMULA_LENGTH} are allowed",
        )
    parser = _Parser(tokenize(text))
    statements = tuple(parser.formula())
    for stmt in statements:
        _check_depth(stmt)
    check_program(statements)
    spellings: dict[tuple[str, bool], str] = {}
    for n in parser.names:
        if n.kind is Kind.READ_WRITE:
            spellings.setdefault(READ_WRITE[n.key], n.spelling)
    return Program(text, statements, tuple(spellings.items()))
