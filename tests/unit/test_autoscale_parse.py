"""Parser: published formulas parse; bad formulas fail with code, line and column."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from coordinator.autoscale import (
    MAX_FORMULA_LENGTH,
    MAX_STATEMENTS,
    SYNTAX_ERROR,
    TOO_LONG,
    FormulaError,
    Program,
    parse,
)

REFERENCE = Path("/work/shared/reference/azure-batch-semantics.md")

# Formulas quoted in the reference (§5), completed where the reference quotes a fragment
# (a bare method call gets a series receiver, a bare expression an assignment).
REFERENCE_SNIPPETS = [
    "$TargetDedicated=1",
    "$TargetDedicatedNodes=3",
    "$TargetDedicatedNodes=1.9",
    "something_useless",
    'x = time("Mon, 06 Oct 2014 10:20:00 GMT")',
    "$curTime = time() + (-6 * TimeInterval_Hour)",
    "v = vec(1, 2, 3); a = avg(v, 7)",
    "s = $RunningTasks.GetSample(1 * TimeInterval_Minute, 6 * TimeInterval_Minute)",
    "s = $CPUPercent.GetSample(TimeInterval_Minute*0, TimeInterval_Minute*10)",
    "s = $CPUPercent.GetSample(10 * TimeInterval_Minute, 95)",
    "s = $CPUPercent.GetSample(10 * TimeInterval_Minute, 80)",
    "$targetDedicatedNodes = 5; totalNodes = 5",
    "$TargetDedicatedNodes = 2; $TargetLowPriorityNodes = 0; $NodeDeallocationOption = requeue",
    """$curTime = time();
$workHours = $curTime.hour >= 8 && $curTime.hour < 18;
$isWeekday = $curTime.weekday >= 1 && $curTime.weekday <= 5;
$isWorkingWeekdayHour = $workHours && $isWeekday;
$TargetDedicatedNodes = $isWorkingWeekdayHour ? 20:10;""",
]

# Published formulas (Azure docs revisions 2015-2019, REST reference, SDK tests, doAzureParallel
# templates with their placeholders filled in), kept as test data.
PUBLISHED = [
    """startingNumberOfVMs = 1;
maxNumberofVMs = 25;
pendingTaskSamplePercent = $PendingTasks.GetSamplePercent(180 * TimeInterval_Second);
pendingTaskSamples = pendingTaskSamplePercent < 70 ? startingNumberOfVMs : avg($PendingTasks.GetSample(180 * TimeInterval_Second));
$TargetDedicatedNodes=min(maxNumberofVMs, pendingTaskSamples);
$NodeDeallocationOption = taskcompletion;""",
    """maxNumberofVMs = 25;
$TargetDedicatedNodes = min(maxNumberofVMs, $PreemptedNodeCount.GetSample(180 * TimeInterval_Second));
$TargetLowPriorityNodes = min(maxNumberofVMs , maxNumberofVMs - $TargetDedicatedNodes);
$NodeDeallocationOption = taskcompletion;""",
    """$totalDedicatedNodes =
    (min($CPUPercent.GetSample(TimeInterval_Minute * 10)) > 0.7) ?
    ($CurrentDedicatedNodes * 1.1) : $CurrentDedicatedNodes;
$totalDedicatedNodes =
    (avg($CPUPercent.GetSample(TimeInterval_Minute * 60)) < 0.2) ?
    ($CurrentDedicatedNodes * 0.9) : $totalDedicatedNodes;
$TargetDedicatedNodes = min(400, $totalDedicatedNodes)""",
    "$TargetDedicatedNodes = (time().weekday == 1 ? 5:1);",
    "$TargetDedicatedNodes = $CurrentDedicatedNodes;",
    "$TargetDedicatedNodes = 0",
    """$curTime = time();
             $workHours = $curTime.hour >= 8 && $curTime.hour < 18;
             $isWeekday = $curTime.weekday >= 1 && $curTime.weekday <= 5;
             $isWorkingWeekdayHour = $workHours && $isWeekday;
             $TargetDedicated = $isWorkingWeekdayHour ? 20:10;""",
    """$curTime = time();
$workHours = $curTime.hour >= 8 && $curTime.hour < 18;
$isWeekday = $curTime.weekday >= 1 && $curTime.weekday <= 5;
$isWorkingWeekdayHour = $workHours && $isWeekday;
$TargetDedicatedNodes = $isWorkingWeekdayHour ? 20:10;
$NodeDeallocationOption = taskcompletion;""",
    """// Get pending tasks for the past 15 minutes.
$samples = $PendingTasks.GetSamplePercent(TimeInterval_Minute * 15);
// If we have fewer than 70 percent data points, we use the last sample point,
// otherwise we use the maximum of last sample point and the history average.
$tasks = $samples < 70 ? max(0,$PendingTasks.GetSample(1)) : max( $PendingTasks.GetSample(1), avg($PendingTasks.GetSample(TimeInterval_Minute * 15)));
// If number of pending tasks is not 0, set targetVM to pending tasks, otherwise
// half of current dedicated.
$targetVMs = $tasks > 0? $tasks:max(0, $TargetDedicatedNodes/2);
// The pool size is capped at 20.
$TargetDedicatedNodes = max(0, min($targetVMs, 20));
// Set node deallocation mode - let running tasks finish before removing a node
$NodeDeallocationOption = taskcompletion;""",
    """// Determine whether 70 percent of the samples have been recorded in the past
// 15 minutes; if not, use last sample
$samples = $ActiveTasks.GetSamplePercent(TimeInterval_Minute * 15);
$tasks = $samples < 70 ? max(0,$ActiveTasks.GetSample(1)) : max( $ActiveTasks.GetSample(1),avg($ActiveTasks.GetSample(TimeInterval_Minute * 15)));
$cores = $TargetDedicatedNodes * 4;
$extraVMs = (($tasks - $cores) + 3) / 4;
$targetVMs = ($TargetDedicatedNodes + $extraVMs);
$TargetDedicatedNodes = max(0,min($targetVMs,3));
$NodeDeallocationOption = taskcompletion;""",
    """
    $TargetDedicatedNodes = 4;
    lifespan         = time() - time("Mon, 06 Oct 2014 10:20:00 GMT");
    span             = TimeInterval_Minute * 60;
    startup          = TimeInterval_Minute * 10;
    ratio            = 50;

    $TargetDedicatedNodes = (lifespan > startup ? (max($RunningTasks.GetSample(span, ratio), $ActiveTasks.GetSample(span, ratio)) == 0 ? 0 : $TargetDedicatedNodes) : 4);
    """,
    "$runningTasksSample = $RunningTasks.GetSample(60 * TimeInterval_Second, 120 * TimeInterval_Second, 75);",
    """totalTVMs  = (min($CPUPercent.GetSample(TimeInterval_Minute*10)) > 0.7) ? ($CurrentDedicated * 1.1) : $CurrentDedicated;
totalTVMs = (avg($CPUPercent.GetSample(TimeInterval_Minute*60)) < 0.2) ? ($CurrentDedicated * 0.9) : totalTVMs;
$TargetDedicated = min(400, totalTVMs);""",
    """$Samples = $ActiveTasks.GetSamplePercent(TimeInterval_Minute * 15);
    $Tasks = $Samples < 70 ? max(0,$ActiveTasks.GetSample(1)) : max( $ActiveTasks.GetSample(1),avg($ActiveTasks.GetSample(TimeInterval_Minute * 15)));
    $Cores = $TargetDedicated * 4;
    $ExtraVMs = ($Tasks - $Cores) / 4;
    $TargetVMs = ($TargetDedicated+$ExtraVMs);$TargetDedicated = max(0,min($TargetVMs,3));
    $TVMDeallocationOption = taskcompletion;""",
    """startingNumberOfVMs = 1;
// set the maximum number of nodes you would like to scale to
maxNumberofVMs = 10;
// Get pending tasks for the past 5 minutes.
$Samples = $ActiveTasks.GetSamplePercent(TimeInterval_Minute * 5);
$Tasks = $Samples < 70 ? max(0,$ActiveTasks.GetSample(1)) : max( $ActiveTasks.GetSample(1), avg($ActiveTasks.GetSample(TimeInterval_Minute * 5)));
$TargetVMs = $Tasks > 0? $Tasks:max(0, $TargetDedicated/2);
$TargetDedicated = max(0,min($TargetVMs,maxNumberofVMs));""",
    "totalNodes=($CPUPercent.GetSamplePercent(TimeInterval_Minute*0,TimeInterval_Minute*10)<0.7?5:(min($CPUPercent.GetSample(TimeInterval_Minute*0, TimeInterval_Minute*10))>0.8?($CurrentDedicated*1.1):$CurrentDedicated));$TargetDedicated=min(100,totalNodes);",
    """startingNumberOfVMs = 1;
maxNumberofVMs = 60;
pendingTaskSamplePercent = $PendingTasks.GetSamplePercent(60 * TimeInterval_Second);
pendingTasksAvg = avg($PendingTasks.GetSample(60 * TimeInterval_Second));
pendingTaskSamples = pendingTaskSamplePercent < 70 ? startingNumberOfVMs : pendingTasksAvg;
$TargetDedicatedNodes=min(maxNumberofVMs, pendingTaskSamples);
//$TargetLowPriorityNodes=min(maxNumberofVMs, pendingTaskSamples);
$NodeDeallocationOption = taskcompletion;""",
    "$TargetLowPriorityNodes = max(0, $PendingTasks.GetSample(TimeInterval_Minute*5));\n$NodeDeallocationOption = taskcompletion;",
    # doAzureParallel templates (weekend reads $curTime without assigning it: parses, fails later)
    "$isWeekend = $curTime.weekday >= 6 && $curTime.weekday <= 7;$TargetDedicatedNodes = $isWeekend ? 1:0;",
    "$totalNodes = (min($CPUPercent.GetSample(TimeInterval_Minute * 10)) > 0.7) ? ($CurrentDedicated * 1.1) : $CurrentDedicated; $totalNodes = (avg($CPUPercent.GetSample(TimeInterval_Minute * 60)) < 0.2) ? ($CurrentDedicated * 0.9) : $totalNodes; $TargetDedicatedNodes = min(3, $totalNodes)",
    "$samples = $ActiveTasks.GetSamplePercent(TimeInterval_Minute * 15);$tasks = $samples < 70 ? max(0,$ActiveTasks.GetSample(1)) : max( $ActiveTasks.GetSample(1), avg($ActiveTasks.GetSample(TimeInterval_Minute * 15)));$maxTasksPerNode = 2;$round = $maxTasksPerNode - 1;$targetVMs = $tasks > 0 ? (($tasks + $round) / $maxTasksPerNode) : max(0, $TargetDedicated/2) + 0.5;$TargetDedicatedNodes = max(0, min($targetVMs, 4));$TargetLowPriorityNodes = max(0, min($targetVMs, 8));$NodeDeallocationOption = taskcompletion;",
]


def _reference_formulas() -> list[str]:
    """Fenced blocks of §5 of the reference that are formulas (not the EBNF)."""
    if not REFERENCE.exists():
        return []
    text = REFERENCE.read_text()
    section = text[text.index("## 5. Autoscale") : text.index("## 6. ")]
    blocks = re.findall(r"```\n(.*?)```", section, re.DOTALL)
    return [b for b in blocks if ":=" not in b]


@pytest.mark.parametrize("formula", REFERENCE_SNIPPETS + PUBLISHED)
def test_published_formula_parses(formula: str) -> None:
    program = parse(formula)
    assert program.statements


def test_reference_fenced_formulas_parse() -> None:
    blocks = _reference_formulas()
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not present on this machine")
    assert blocks, "the reference's §5 should quote at least the worked example"
    for block in blocks:
        assert parse(block).statements
        assert block.strip() in [s.strip() for s in REFERENCE_SNIPPETS]  # copy kept in sync


@pytest.mark.parametrize(
    ("formula", "line", "column", "fragment"),
    [
        ("a = 1 b = 2", 1, 7, "expected ';' between statements"),
        ("a = 1;\n  b = (2 + ;", 2, 12, "expected a value, found ';'"),
        ("a = (1 + 2", 1, 11, "expected ')' to close '('"),
        ("x = 1;;", 1, 7, "empty statement"),
        (";", 1, 1, "empty statement"),
        ("x = avg()", 1, 5, "avg() needs at least one value"),
        ("x = ceil(2.5)", 1, 5, "unknown function 'ceil'"),
        ("x = $CPUPercent.GetAverage()", 1, 17, "unknown member or method 'GetAverage'"),
        ("x = $CPUPercent + 1", 1, 5, "holds samples"),
        ("x = $CPUPercent", 1, 5, "holds samples"),
        ("x = time().hour()", 1, 16, "is a timestamp member, not a method"),
        ("x = $ActiveTasks.Count", 1, 23, "expected '(' after Count"),
        ("x = 1 < 2 < 3", 1, 11, "comparisons cannot be chained"),
        ('x = "abc', 1, 5, "unterminated string"),
        ("x = 'abc'", 1, 5, "double quotes"),
        ("x = 7 % 2", 1, 7, "no '%'"),
        ("x = 1 & 2", 1, 7, "use '&&'"),
        ("x = 1 | 2", 1, 7, "use '||'"),
        ("x = .5", 1, 5, "must start with a digit"),
        ("x = 1e", 1, 5, "malformed number"),
        ("x = $", 1, 5, "'$' must be followed"),
        ("x = 1 @ 2", 1, 7, "unexpected character '@'"),
        ("x = [1, 2]", 1, 5, "vec(...)"),
        ("$CurrentDedicated = 4", 1, 1, "read-only"),
        ("$ActiveTasks = 4", 1, 1, "read-only"),
        ("TimeInterval_Minute = 4", 1, 1, "read-only"),
        ("requeue = 4", 1, 1, "read-only"),
        ("x = TimeInterval_Fortnight", 1, 5, "unknown time interval constant"),
        ("x = TimeInterval_Minute + 1", 1, 25, "cannot combine a timeinterval and a double"),
        ("x = 1 - time()", 1, 7, "cannot combine a double and a timestamp"),
        ("x = -time()", 1, 5, "cannot be applied to a timestamp"),
        ('x = "a" + "b"', 1, 9, "cannot combine a string and a string"),
        ("x = time() ? 1 : 2", 1, 5, "condition of '?:' must be a double"),
        ("x = (1 ? 2)", 1, 11, "expected ':'"),
        ("x = TimeInterval_Hour.hour", 1, 23, "needs a timestamp"),
        ('x = time("yesterday")', 1, 10, "invalid date-time"),
        ("x = time(1)", 1, 5, "must be a string"),
        ("x = time(1, 2)", 1, 5, "at most one argument"),
        ("x = rand(1)", 1, 5, "takes no arguments"),
        ("x = percentile(vec(1, 2))", 1, 5, "takes 2 arguments"),
        ("x = val(vec(1, 2), time())", 1, 5, "argument 2 of val() must be a double"),
        ('x = max(1, "a")', 1, 5, "argument 2 of max() must be a double or doubleVec"),
        ("x = $ActiveTasks.GetSample(1, 2)", 1, 18, "GetSample(count) takes a single argument"),
        ("x = $ActiveTasks.GetSample()", 1, 18, "takes 1 to 3 arguments"),
        ('x = $ActiveTasks.GetSample("a")', 1, 18, "argument 1 of GetSample()"),
        ("x = $ActiveTasks.GetSample(TimeInterval_Hour, 50, 2)", 1, 18, "no third argument"),
        ("x = $ActiveTasks.GetSamplePercent(5)", 1, 18, "must be a timeinterval or timestamp"),
        ("x = $ActiveTasks.Count(1)", 1, 18, "takes no arguments"),
        ("x = time().GetSample(1)", 1, 12, "method of sample variables"),
        ("x = $ActiveTasks(1)", 1, 5, "unknown function '$ActiveTasks'"),
        ("x = time()(1)", 1, 11, "expected ';' between statements, found '('"),
        ("$TargetDedicatedNodes = time()", 1, 25, "must be a number, not a timestamp"),
        ("$TargetDedicatedNodes = vec(1)", 1, 25, "must be a number, not a doubleVec"),
        ("$NodeDeallocationOption = 1", 1, 27, "must be one of requeue"),
        ('$NodeDeallocationOption = "later"', 1, 27, "not a deallocation option"),
        ("x = $y = 2", 1, 8, "expected ';' between statements, found '='"),
        ("x = 1 +", 1, 8, "found end of formula"),
        ("x = time(); y = x + 1", 1, 19, "cannot combine a timestamp and a double"),
        ("x = vec(1); $TargetDedicatedNodes = x", 1, 37, "must be a number, not a doubleVec"),
        ("x = $TargetDedicated.\n  year", 2, 3, "needs a timestamp"),
    ],
)
def test_syntax_error_points_at_line_and_column(
    formula: str, line: int, column: int, fragment: str
) -> None:
    with pytest.raises(FormulaError) as info:
        parse(formula)
    err = info.value
    assert err.code == SYNTAX_ERROR
    assert fragment in err.message
    assert (err.line, err.column) == (line, column), err.message
    assert err.message.startswith(f"line {line}, column {column}: ")
    assert str(err) == err.message


def test_comments_whitespace_and_optional_final_semicolon() -> None:
    text = "// leading comment\n\ta = 1 ; // trailing\r\n  b = a + 1 // no final semicolon"
    assert len(parse(text).statements) == 2
    assert len(parse(text + ";").statements) == 2
    assert parse("// only a comment").statements == ()
    assert parse("").statements == ()


def test_names_are_case_insensitive() -> None:
    program = parse(
        "$TARGETDEDICATEDNODES = MAX(1, $activetasks.getsample(1)); x = timeinterval_MINUTE;"
        "$nodeDeallocationOption = TaskCompletion; y = TIME().Weekday"
    )
    assert len(program.statements) == 4


def test_length_limit() -> None:
    ok = "x = 1;" + " " * (MAX_FORMULA_LENGTH - 6)
    assert len(ok) == 8192
    parse(ok)
    with pytest.raises(FormulaError) as info:
        parse(ok + " ")
    assert info.value.code == TOO_LONG
    assert "8193 characters" in info.value.message
    assert info.value.line is None


def test_statement_limit() -> None:
    parse(";".join(f"v{i} = {i}" for i in range(MAX_STATEMENTS)))
    text = ";\n".join(f"v{i} = {i}" for i in range(MAX_STATEMENTS + 1))
    with pytest.raises(FormulaError) as info:
        parse(text)
    assert info.value.code == SYNTAX_ERROR
    assert "too many statements: at most 100" in info.value.message
    assert (info.value.line, info.value.column) == (101, 1)


def test_nesting_limits_give_errors_not_crashes() -> None:
    parse("x = " + "(" * 39 + "1" + ")" * 39)
    parse("x = " + " + ".join(["1"] * 99))
    for text in (
        "x = " + "(" * 200 + "1" + ")" * 200,
        "x = " + "-" * 500 + "1",
        "x = " + " + ".join(["1"] * 1000),
        "x = " + "max(" * 100 + "1" + ")" * 100,
    ):
        with pytest.raises(FormulaError) as info:
            parse(text)
        assert info.value.code == SYNTAX_ERROR
        assert "nested too deeply" in info.value.message or "too complex" in info.value.message


def test_non_string_formula_is_refused() -> None:
    with pytest.raises(FormulaError, match="must be a string"):
        parse(42)  # type: ignore[arg-type]


def test_program_is_immutable() -> None:
    program = parse("x = 1")
    assert isinstance(program, Program)
    with pytest.raises(dataclasses.FrozenInstanceError):
        program.text = "y = 2"  # type: ignore[misc]
