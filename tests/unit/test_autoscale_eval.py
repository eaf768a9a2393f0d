"""Evaluator: operators, functions, constants, results string, targets, leniency, errors."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest

from coordinator.autoscale import (
    EVALUATION_ERROR,
    AutoscaleInputs,
    AutoscaleResult,
    Sample,
    evaluate,
    parse,
)

NOW = datetime(2016, 10, 13, 7, 18, 47, 805000, tzinfo=UTC)  # a Thursday, before 08:00 UTC

WORKED_EXAMPLE = """
        $curTime = time();
        $workHours = $curTime.hour >= 8 && $curTime.hour < 18;
        $isWeekday = $curTime.weekday >= 1 && $curTime.weekday <= 5;
        $isWorkingWeekdayHour = $workHours && $isWeekday;
        $TargetDedicatedNodes = $isWorkingWeekdayHour ? 20:10;
    """


def run(formula: str, **kw: Any) -> AutoscaleResult:
    return evaluate(parse(formula), AutoscaleInputs(now=kw.pop("now", NOW), **kw))


def results(formula: str, **kw: Any) -> dict[str, str]:
    r = run(formula, **kw)
    assert r.error is None, r.error
    return dict(part.split("=", 1) for part in r.results.split(";"))


def value(expr: str, **kw: Any) -> str:
    return results(f"zz = {expr}", **kw)["zz"]


def test_worked_example_reproduces_results_string() -> None:
    r = run(WORKED_EXAMPLE)
    assert r.results == (
        "$TargetDedicatedNodes=10;$NodeDeallocationOption=requeue;"
        "$curTime=2016-10-13T07:18:47.805Z;$isWeekday=1;$isWorkingWeekdayHour=0;$workHours=0"
    )
    assert (r.target_dedicated, r.target_low_priority, r.deallocation_option, r.error) == (
        10,
        None,
        None,
        None,
    )


def test_worked_example_with_modern_low_priority_reporting() -> None:
    during_work = datetime(2016, 10, 13, 9, 0, tzinfo=UTC)
    r = run(WORKED_EXAMPLE, now=during_work, report_low_priority=True, target_low_priority=2)
    assert r.results.startswith(
        "$TargetDedicatedNodes=20;$TargetLowPriorityNodes=2;$NodeDeallocationOption=requeue;"
        "$curTime=2016-10-13T09:00:00.000Z;$isWeekday=1;$isWorkingWeekdayHour=1;$workHours=1"
    )
    assert r.target_dedicated == 20
    assert r.target_low_priority is None  # reported, not set


def test_modern_sdk_observation() -> None:
    r = run("$TargetDedicatedNodes=3", report_low_priority=True)
    assert (
        r.results
        == "$TargetDedicatedNodes=3;$TargetLowPriorityNodes=0;$NodeDeallocationOption=requeue"
    )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1 + 2", "3"),
        ("7 - 10", "-3"),
        ("2 * 3.5", "7"),
        ("1 / 4", "0.25"),
        ("1 / 3", "0.3333333333333333"),
        ("0.1 + 0.2", "0.30000000000000004"),
        ("1e16", "1E+16"),
        ("2.5E-3", "0.0025"),
        ("-0", "0"),
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("10 - 2 - 3", "5"),
        ("8 / 4 / 2", "1"),
        ("-2 * 3", "-6"),
        ("- -3", "3"),
        ("!0", "1"),
        ("!5", "0"),
        ("!!7", "1"),
        ("1 < 2", "1"),
        ("2 < 1", "0"),
        ("2 <= 2", "1"),
        ("2 == 2", "1"),
        ("2 >= 3", "0"),
        ("3 > 2", "1"),
        ("3 != 3", "0"),
        ("1 + 1 == 2", "1"),
        ("1 < 2 && 2 < 3", "1"),
        ("2 && 0", "0"),
        ("0 || 0", "0"),
        ("0 || 3", "1"),
        ("1 || 0 && 0", "1"),
        ("1 ? 2 : 3", "2"),
        ("0 ? 2 : 3", "3"),
        ("0.5 ? 2 : 3", "2"),
        ("0 ? 1 : 0 ? 2 : 3", "3"),
        ("1 ? 0 ? 5 : 6 : 7", "6"),
        ("1 < 2 ? 10 : 20", "10"),
        ("vec(1, 2, 3) + 1", "[2,3,4]"),
        ("vec(1, 2) * vec(3, 4)", "[3,8]"),
        ("vec(5, 4) - vec(1, 1)", "[4,3]"),
        ("vec(2, 4) / 2", "[1,2]"),
        ("2 * vec(1, 2)", "[2,4]"),
        ("10 - vec(1, 2)", "[9,8]"),
        ('"abc" < "abd"', "1"),
        ('"a" == "a"', "1"),
        ('"a" != "a"', "0"),
        ('"b" >= "a"', "1"),
        ("TimeInterval_Hour < TimeInterval_Minute", "0"),
        ("TimeInterval_Hour == 60 * TimeInterval_Minute", "1"),
        ('time() > time("2014-10-06T10:20:00Z")', "1"),
        ('time() <= time("2014-10-06T10:20:00Z")', "0"),
    ],
)
def test_operators(expr: str, expected: str) -> None:
    assert value(expr) == expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("TimeInterval_Zero", "00:00:00"),
        ("TimeInterval_100ns", "00:00:00.0000001"),
        ("TimeInterval_Microsecond", "00:00:00.0000010"),
        ("TimeInterval_Millisecond", "00:00:00.0010000"),
        ("TimeInterval_Second", "00:00:01"),
        ("TimeInterval_Minute", "00:01:00"),
        ("TimeInterval_Hour", "01:00:00"),
        ("TimeInterval_Day", "1.00:00:00"),
        ("TimeInterval_Week", "7.00:00:00"),
        ("TimeInterval_Year", "365.00:00:00"),
        ("TimeInterval_Minute * 1.5", "00:01:30"),
        ("2 * TimeInterval_Hour", "02:00:00"),
        ("TimeInterval_Day / 4", "06:00:00"),
        ("TimeInterval_Hour + TimeInterval_Minute", "01:01:00"),
        ("TimeInterval_Hour - TimeInterval_Day", "-23:00:00"),
        ("-TimeInterval_Week", "-7.00:00:00"),
        ('time("2014-10-06T10:20:00Z") + TimeInterval_Day', "2014-10-07T10:20:00.000Z"),
        ('TimeInterval_Hour + time("2014-10-06T10:20:00Z")', "2014-10-06T11:20:00.000Z"),
        ('time("2014-10-06T10:20:00Z") - TimeInterval_Hour', "2014-10-06T09:20:00.000Z"),
        ('time("2014-10-07T00:00:00Z") - time("2014-10-06T10:20:00Z")', "13:40:00"),
        ("time() + (-6 * TimeInterval_Hour)", "2016-10-13T01:18:47.805Z"),
        ("time()", "2016-10-13T07:18:47.805Z"),
        ('time("")', "2016-10-13T07:18:47.805Z"),
        ('time("Mon, 06 Oct 2014 10:20:00 GMT")', "2014-10-06T10:20:00.000Z"),
        ('time("06 Oct 2014 10:20 +0100")', "2014-10-06T09:20:00.000Z"),
        ('time("2014-10-06T12:20:00+02:00")', "2014-10-06T10:20:00.000Z"),
        ('time("2014-10-06T10:20:00.1234567Z")', "2014-10-06T10:20:00.123Z"),
        ('time("2014-10-06")', "2014-10-06T00:00:00.000Z"),
        ('time("2014")', "2014-01-01T00:00:00.000Z"),
        ('time("2014-10-05T10:20:30Z").year', "2014"),
        ('time("2014-10-05T10:20:30Z").month', "10"),
        ('time("2014-10-05T10:20:30Z").day', "5"),
        ('time("2014-10-05T10:20:30Z").weekday', "7"),
        ('time("2014-10-06T10:20:30Z").weekday', "1"),
        ('time("2014-10-05T10:20:30Z").hour', "10"),
        ('time("2014-10-05T10:20:30Z").minute', "20"),
        ('time("2014-10-05T10:20:30Z").second', "30"),
    ],
)
def test_time_values(expr: str, expected: str) -> None:
    assert value(expr) == expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("avg(1, 2, 3)", "2"),
        ("avg(vec(1, 2, 3), 7)", "3.25"),
        ("len(vec(1, 2), 3)", "3"),
        ("len()", "0"),
        ("lg(8)", "3"),
        ("lg(vec(8))", "[3]"),
        ("lg(2, 4)", "[1,2]"),
        ("ln(1)", "0"),
        ("ln(vec(1, 1))", "[0,0]"),
        ("log(1000)", "3"),
        ("log(vec(10, 100))", "[1,2]"),
        ("max(1, vec(5, 2))", "5"),
        ("min(vec(5, 2), 3)", "2"),
        ("norm(3, 4)", "5"),
        ("norm()", "0"),
        ("percentile(vec(15, 20, 35, 40, 50), 30)", "20"),
        ("percentile(vec(15, 20, 35, 40, 50), 40)", "20"),
        ("percentile(vec(50, 40, 35, 20, 15), 0)", "15"),
        ("percentile(vec(15, 20, 35, 40, 50), 100)", "50"),
        ("percentile(7, 50)", "7"),
        ("range(vec(3, 9), 1)", "8"),
        ("std(2, 4, 4, 4, 5, 5, 7, 9)", "2.138089935299395"),
        ("sum(vec(1, 2), 3)", "6"),
        ("sum()", "0"),
        ("val(vec(5, 6, 7), 0)", "5"),
        ("val(vec(5, 6, 7), 2)", "7"),
        ("vec(1, vec(2, 3))", "[1,2,3]"),
        ("vec()", "[]"),
    ],
)
def test_functions(expr: str, expected: str) -> None:
    assert value(expr) == expected


def test_a_target_that_is_not_a_finite_number_is_an_evaluation_error() -> None:
    """NaN samples (a broken agent's CPU figure) averaged into a target: an evaluation error,
    never an exception out of `evaluate` (it once raised ValueError making NaN a count)."""
    nan = [Sample(NOW, math.nan), Sample(NOW, 1.0)]
    r = run("$TargetDedicatedNodes = avg($CPUPercent.GetSample(2));", series={"CPUPercent": nan})
    assert r.error is not None
    assert r.error[0] == EVALUATION_ERROR
    assert "not a finite number" in r.error[1]
    kept = results(
        "$x = avg($CPUPercent.GetSample(2)); $TargetDedicatedNodes = 1;", series={"CPUPercent": nan}
    )
    assert kept["$TargetDedicatedNodes"] == "1"


def test_rand_is_uniform_and_seedable() -> None:
    r1 = results("a = rand(); b = rand()", random_seed=7)
    r2 = results("a = rand(); b = rand()", random_seed=7)
    assert r1 == r2
    assert r1["a"] != r1["b"]
    for v in (float(r1["a"]), float(r1["b"])):
        assert 0.0 <= v <= 1.0


def test_scalar_service_variables_read_inputs() -> None:
    r = results(
        "a = $CurrentDedicatedNodes; b = $CurrentDedicated; c = $CurrentLowPriorityNodes;"
        "d = $TaskSlotsPerNode; e = $UsableNodeCount; f = $TargetDedicatedNodes;"
        "g = $TargetLowPriorityNodes; h = $NodeDeallocationOption",
        current_dedicated=3,
        current_low_priority=4,
        task_slots_per_node=5,
        usable_node_count=6,
        target_dedicated=7,
        target_low_priority=8,
        deallocation_option="terminate",
    )
    assert [r[k] for k in "abcdefgh"] == ["3", "3", "4", "5", "6", "7", "8", "terminate"]


def test_short_circuit_and_lazy_ternary() -> None:
    r = results("v = vec(); a = 0 && avg(v) > 1; b = 1 || avg(v) > 1; c = 1 ? 2 : 1 / 0")
    assert (r["a"], r["b"], r["c"]) == ("0", "1", "2")


# ---- results string, spellings, aliases


def test_results_use_the_formulas_spelling() -> None:
    assert run("$TargetDedicated=1").results == "$TargetDedicated=1;$NodeDeallocationOption=requeue"
    r = run("$targetDedicatedNodes = 5; totalNodes = 5")
    assert r.results == "$targetDedicatedNodes=5;$NodeDeallocationOption=requeue;totalNodes=5"
    assert r.target_dedicated == 5
    r = run("$TVMDeallocationOption = taskcompletion; $TargetDedicated = 2")
    assert r.results == "$TargetDedicated=2;$TVMDeallocationOption=taskcompletion"
    assert (r.target_dedicated, r.deallocation_option) == (2, "taskcompletion")


def test_full_name_wins_over_alias() -> None:
    for formula in (
        "$TargetDedicated = 1; $TargetDedicatedNodes = 2",
        "$TargetDedicatedNodes = 2; $TargetDedicated = 1",
    ):
        r = run(formula)
        assert r.target_dedicated == 2
        assert r.results.startswith("$TargetDedicatedNodes=2;")
    r = run(
        "$TargetLowPriority = 3; $TargetLowPriorityNodes = 4; "
        "$TVMDeallocationOption = terminate; $NodeDeallocationOption = retaineddata"
    )
    assert (r.target_low_priority, r.deallocation_option) == (4, "retaineddata")
    assert r.results == (
        "$TargetDedicatedNodes=0;$TargetLowPriorityNodes=4;$NodeDeallocationOption=retaineddata"
    )


def test_alias_read_only_is_reported_under_its_spelling() -> None:
    r = run("x = $TargetDedicated / 2", target_dedicated=3)
    assert r.results == "$TargetDedicated=3;$NodeDeallocationOption=requeue;x=1.5"
    assert r.target_dedicated is None


def test_low_priority_only_when_mentioned_or_requested() -> None:
    r = run("$TargetLowPriority = 4")
    assert (
        r.results == "$TargetDedicatedNodes=0;$TargetLowPriority=4;$NodeDeallocationOption=requeue"
    )
    assert (r.target_dedicated, r.target_low_priority) == (None, 4)


def test_user_variables_sorted_case_insensitively_with_first_spelling() -> None:
    r = run("b = 1; $a = 2; A2 = 3; _z = 4; $Tasks = 1; $tasks = $TASKS + 1")
    assert r.results == (
        "$TargetDedicatedNodes=0;$NodeDeallocationOption=requeue;$a=2;$Tasks=2;_z=4;A2=3;b=1"
    )


def test_value_formatting_of_every_type() -> None:
    r = results('s = "hello"; o = retaineddata; v = vec(1.5, -2); i = TimeInterval_Second * 90.5')
    assert (r["s"], r["o"], r["v"], r["i"]) == (
        "hello",
        "retaineddata",
        "[1.5,-2]",
        "00:01:30.5000000",
    )


def test_deallocation_option_from_string() -> None:
    r = run('$NodeDeallocationOption = "TaskCompletion"')
    assert r.deallocation_option == "taskcompletion"
    assert r.results == "$TargetDedicatedNodes=0;$NodeDeallocationOption=taskcompletion"


# ---- targets


@pytest.mark.parametrize(
    ("assigned", "target", "shown"),
    [("1.9", 1, "1.9"), ("2.999", 2, "2.999"), ("-3", 0, "-3"), ("0", 0, "0"), ("7", 7, "7")],
)
def test_targets_truncate_and_clamp(assigned: str, target: int, shown: str) -> None:
    r = run(f"$TargetDedicatedNodes = {assigned}; $TargetLowPriorityNodes = {assigned}")
    assert (r.target_dedicated, r.target_low_priority) == (target, target)
    assert r.results.startswith(f"$TargetDedicatedNodes={shown};$TargetLowPriorityNodes={shown};")


def test_stop_keeps_what_was_assigned() -> None:
    r = run("$TargetDedicatedNodes = 1; stop(); $TargetDedicatedNodes = 5")
    assert r.error is None
    assert r.target_dedicated == 1
    r = run("a = 1; x = a ? stop() : 2; y = 3")
    assert r.results == "$TargetDedicatedNodes=0;$NodeDeallocationOption=requeue;a=1"


# ---- leniency (reference §5.8)


def test_bare_unknown_identifier_is_tolerated_and_targets_stay() -> None:
    r = run("something_useless", target_dedicated=2)
    assert r.error is None
    assert r.results == "$TargetDedicatedNodes=2;$NodeDeallocationOption=requeue"
    assert (r.target_dedicated, r.target_low_priority, r.deallocation_option) == (None, None, None)


def test_bare_expressions_are_evaluated() -> None:
    assert run("1 + 1; $TargetDedicatedNodes; $ActiveTasks; x = 1").error is None
    assert run("1 / 0").error is not None


def test_reading_an_unassigned_variable_fails_the_evaluation() -> None:
    r = run("$TargetDedicatedNodes = 3;\nx = y + 1")
    assert r.error == (
        EVALUATION_ERROR,
        "line 2, column 5: variable 'y' is read before it is assigned",
    )
    assert (r.results, r.target_dedicated) == ("", None)
    weekend = "$isWeekend = $curTime.weekday >= 6 && $curTime.weekday <= 7;$TargetDedicatedNodes = $isWeekend ? 1:0;"
    assert run(weekend).error is not None


# ---- run-time errors


@pytest.mark.parametrize(
    ("formula", "position", "fragment"),
    [
        ("x = 1 / 0", "line 1, column 7", "division by zero"),
        ("x = vec(1) / 0", "line 1, column 12", "division by zero"),
        ("x = TimeInterval_Hour / 0", "line 1, column 23", "division by zero"),
        ("v = vec(); x = avg(v)", "line 1, column 16", "avg() of an empty list"),
        ("x = max(vec())", "line 1, column 5", "max() of an empty list"),
        ("x = min(vec())", "line 1, column 5", "min() of an empty list"),
        ("x = range(vec())", "line 1, column 5", "range() of an empty list"),
        ("x = vec(1, 2) + vec(1)", "line 1, column 15", "different lengths"),
        ("x = ln(0)", "line 1, column 5", "non-positive"),
        ("x = lg(vec(1, -1))", "line 1, column 5", "non-positive"),
        ("x = log(-5)", "line 1, column 5", "non-positive"),
        ("x = std(1)", "line 1, column 5", "at least 2 values"),
        ("x = val(vec(1), 1)", "line 1, column 5", "out of range"),
        ("x = val(vec(1, 2), 0.5)", "line 1, column 5", "out of range"),
        ("x = percentile(vec(1), 101)", "line 1, column 5", "between 0 and 100"),
        ("x = percentile(vec(), 50)", "line 1, column 5", "empty list"),
        (
            "c = 1;\ny = c ? time() : 1; z = y + 1",
            "line 2, column 27",
            "cannot combine a timestamp and a double",
        ),
        (
            "c = 1; y = c ? time() : 1; z = -y",
            "line 1, column 32",
            "cannot be applied to a timestamp",
        ),
        (
            "c = 1; y = c ? time() : 1; z = y ? 1 : 2",
            "line 1, column 32",
            "condition must be a double",
        ),
        ("c = 1; y = c ? 1 : time(); z = y.hour", "line 1, column 35", "needs a timestamp"),
        ('c = 1; y = c ? 1 : "x"; z = time(y)', "line 1, column 29", "must be a string"),
        (
            'c = 1; y = c ? "x" : 2; z = avg(y)',
            "line 1, column 29",
            "must be a double or doubleVec",
        ),
        ('c = 1; y = c ? "nope" : 1; z = time(y)', "line 1, column 32", "invalid date-time"),
        (
            "c = 1; v = c ? vec(1) : 1; $TargetDedicatedNodes = v",
            "line 1, column 52",
            "must be a number, not a doubleVec",
        ),
        (
            'c = 1; o = c ? "bogus" : requeue; $NodeDeallocationOption = o',
            "line 1, column 61",
            "must be one of",
        ),
        ("$TargetDedicatedNodes = 1e10", "line 1, column 25", "too large"),
        ("x = 1e308 * 10", "line 1, column 11", "not a finite number"),
        ("x = TimeInterval_Year * 1e300", "line 1, column 23", "time interval out of range"),
        ("x = time() + TimeInterval_Year * 10000", "line 1, column 12", "timestamp out of range"),
    ],
)
def test_runtime_errors_are_reported_not_raised(formula: str, position: str, fragment: str) -> None:
    r = run(f"$TargetDedicatedNodes = 4; {formula}" if "\n" not in formula else formula)
    assert r.error is not None
    code, message = r.error
    assert code == EVALUATION_ERROR
    assert fragment in message
    if "\n" in formula:
        assert message.startswith(position)
    assert (r.results, r.target_dedicated, r.target_low_priority, r.deallocation_option) == (
        "",
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("formula", "line", "column"),
    [
        ("x = 1 / 0", 1, 7),
        ("v = vec();\n  x = avg(v)", 2, 7),
        ("c = 1; y = c ? time() : 1; z = y + 1", 1, 34),
    ],
)
def test_runtime_error_positions(formula: str, line: int, column: int) -> None:
    r = run(formula)
    assert r.error is not None
    assert r.error[1].startswith(f"line {line}, column {column}: ")


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        AutoscaleInputs(now=datetime(2016, 1, 1))  # noqa: DTZ001
    with pytest.raises(ValueError, match="unknown series"):
        AutoscaleInputs(now=NOW, series={"Bogus": []})
    with pytest.raises(ValueError, match="deallocation_option"):
        AutoscaleInputs(now=NOW, deallocation_option="later")


def test_now_is_the_only_clock() -> None:
    later = datetime(2030, 5, 6, 23, 59, 59, tzinfo=UTC)
    assert value("time()", now=later) == "2030-05-06T23:59:59.000Z"
    assert math.isclose(
        float(
            value(
                '(time() - time("2030-05-06T00:00:00Z")) == 86399 * TimeInterval_Second', now=later
            )
        ),
        1,
    )
