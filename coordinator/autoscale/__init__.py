"""Autoscale formula engine (reference §5): ``parse`` a formula, ``evaluate`` it on inputs.

Pure: no I/O, no clock (time() is ``inputs.now``).
"""

from ._errors import (
    EVALUATION_ERROR,
    INSUFFICIENT_SAMPLE_DATA,
    MAX_FORMULA_LENGTH,
    MAX_STATEMENTS,
    SYNTAX_ERROR,
    TOO_LONG,
    FormulaError,
)
from ._evaluator import evaluate
from ._inputs import AutoscaleInputs, AutoscaleResult, Sample
from ._names import DEALLOCATION_OPTIONS, SERIES_NAMES
from ._parser import Program, parse

__all__ = [
    "DEALLOCATION_OPTIONS",
    "EVALUATION_ERROR",
    "INSUFFICIENT_SAMPLE_DATA",
    "MAX_FORMULA_LENGTH",
    "MAX_STATEMENTS",
    "SERIES_NAMES",
    "SYNTAX_ERROR",
    "TOO_LONG",
    "AutoscaleInputs",
    "AutoscaleResult",
    "FormulaError",
    "Program",
    "Sample",
    "evaluate",
    "parse",
]
