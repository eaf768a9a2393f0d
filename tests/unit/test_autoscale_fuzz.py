"""Property: any text either parses or raises FormulaError; evaluation never raises."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.autoscale import (
    AutoscaleInputs,
    AutoscaleResult,
    FormulaError,
    Sample,
    evaluate,
    parse,
)

NOW = datetime(2024, 3, 4, 12, 0, tzinfo=UTC)
INPUTS = AutoscaleInputs(
    now=NOW,
    series={
        "ActiveTasks": [Sample(NOW - i * timedelta(seconds=30), float(i % 4)) for i in range(30)],
        # what a broken agent's heartbeats could make of a series: formulas must still not raise
        "CPUPercent": [
            Sample(NOW - i * timedelta(seconds=30), v)
            for i, v in enumerate([math.nan, math.inf, -math.inf, 1e308, 0.5] * 4)
        ],
    },
)
PIECES = [
    "x",
    "$y",
    "$TargetDedicatedNodes",
    "$TargetDedicated",
    "$NodeDeallocationOption",
    "$ActiveTasks",
    "$CPUPercent",
    ".GetSample(",
    ".GetSamplePercent(",
    ".Count()",
    ".HistoryBeginTime()",
    ".GetSamplePeriod()",
    ".hour",
    ".weekday",
    "TimeInterval_Minute",
    "TimeInterval_100ns",
    "requeue",
    "taskcompletion",
    "time(",
    '"2014-10-06T10:20:00Z"',
    '"abc"',
    "avg(",
    "max(",
    "min(",
    "vec(",
    "val(",
    "percentile(",
    "std(",
    "lg(",
    "ln(",
    "log(",
    "len(",
    "sum(",
    "norm(",
    "range(",
    "rand(",
    "stop(",
    "0",
    "1",
    "2.5",
    "1e3",
    "100",
    "=",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "!",
    "&&",
    "||",
    "?",
    ":",
    "(",
    ")",
    ",",
    ";",
    " ",
    "\n",
    "// c\n",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_parse_and_evaluate_never_crash(pieces: list[str]) -> None:
    text = "".join(pieces)
    try:
        program = parse(text)
    except FormulaError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert error.code
        assert error.message
        return
    result = evaluate(program, INPUTS)
    assert isinstance(result, AutoscaleResult)
    if result.error is not None:
        assert result.target_dedicated is None
        assert result.results == ""


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_text_gives_formula_errors_only(text: str) -> None:
    try:
        program = parse(text)
    except FormulaError:
        return
    assert isinstance(evaluate(program, INPUTS), AutoscaleResult)
