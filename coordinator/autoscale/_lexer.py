"""Tokenizer: numbers, double-quoted strings, identifiers, operators; ``//`` comments."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import SYNTAX_ERROR, FormulaError

NUMBER = "number"
STRING = "string"
IDENT = "identifier"
OP = "operator"
EOF = "end of formula"

# Longest first, so "<=" wins over "<".
_OPERATORS = (
    "==",
    "!=",
    "<=",
    ">=",
    "&&",
    "||",
    "+",
    "-",
    "*",
    "/",
    "<",
    ">",
    "!",
    "?",
    ":",
    ";",
    ",",
    ".",
    "(",
    ")",
    "=",
)
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HINTS = {
    "&": "there is no '&' operator; use '&&'",
    "|": "there is no '|' operator; use '||'",
    "%": "there is no '%' (modulo) operator",
    "'": "strings are written in double quotes",
    "[": "vectors are built with vec(...), not brackets",
}


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    line: int
    column: int

    def describe(self) -> str:
        if self.kind == EOF:
            return EOF
        return f"{self.kind} '{self.text}'" if self.kind != OP else f"'{self.text}'"


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, line, line_start, n = 0, 1, 0, len(text)
    while i < n:
        ch = text[i]
        col = i - line_start + 1
        if ch == "\n":
            i, line, line_start = i + 1, line + 1, i + 1
        elif ch in " \t\r\f\v":
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif ch.isascii() and ch.isdigit():
            m = _NUMBER.match(text, i)
            assert m is not None
            if m.end() < n and text[m.end()] in "eE":
                raise FormulaError(
                    SYNTAX_ERROR, f"malformed number '{text[i : m.end() + 1]}'", line, col
                )
            tokens.append(Token(NUMBER, m.group(), line, col))
            i = m.end()
        elif ch == '"':
            end = i + 1
            while end < n and text[end] not in '"\n':
                end += 1
            if end >= n or text[end] != '"':
                raise FormulaError(
                    SYNTAX_ERROR, "unterminated string (missing closing '\"')", line, col
                )
            tokens.append(Token(STRING, text[i + 1 : end], line, col))
            i = end + 1
        elif ch == "$" or ch == "_" or (ch.isascii() and ch.isalpha()):
            m = _NAME.match(text, i + 1 if ch == "$" else i)
            if m is None:
                raise FormulaError(
                    SYNTAX_ERROR, "'$' must be followed by a variable name", line, col
                )
            tokens.append(Token(IDENT, text[i : m.end()], line, col))
            i = m.end()
        elif ch == "." and i + 1 < n and text[i + 1].isdigit():
            raise FormulaError(
                SYNTAX_ERROR, "a number must start with a digit (write 0.5, not .5)", line, col
            )
        else:
            op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
            if op is None:
                hint = _HINTS.get(ch, f"unexpected character {ch!r}")
                raise FormulaError(SYNTAX_ERROR, hint, line, col)
            tokens.append(Token(OP, op, line, col))
            i += len(op)
    tokens.append(Token(EOF, "", line, n - line_start + 1))
    return tokens
