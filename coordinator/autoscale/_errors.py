"""Error type and error codes of the formula engine."""

from __future__ import annotations

# Codes as the reference (§5.8, §6.1, §8.4) spells them.
SYNTAX_ERROR = "AutoScalingFormulaSyntaxError"
TOO_LONG = "AutoScaleFormulaTooLong"
INSUFFICIENT_SAMPLE_DATA = "InsufficientSampleData"
# Not documented by Microsoft: every other evaluation failure (type error at run time, division by
# zero, reading an unassigned variable, empty vector in avg(), ...).
EVALUATION_ERROR = "AutoScalingFormulaEvaluationError"

MAX_FORMULA_LENGTH = 8192
MAX_STATEMENTS = 100


def at(line: int, column: int, text: str) -> str:
    return f"line {line}, column {column}: {text}"


class FormulaError(Exception):
    """A formula that cannot be accepted (raised by ``parse``)."""

    def __init__(self, code: str, text: str, line: int | None = None, column: int | None = None):
        self.code = code
        self.line = line
        self.column = column
        self.message = at(line, column, text) if line is not None and column is not None else text
        super().__init__(self.message)


class EvalError(Exception):
    """Internal: a run-time failure; ``evaluate`` turns it into ``AutoscaleResult.error``."""

    def __init__(self, text: str, line: int, column: int, code: str = EVALUATION_ERROR):
        self.code = code
        self.message = at(line, column, text)
        super().__init__(self.message)
