"""Sample methods on series variables, insufficient-data errors, and clock-driven runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from coordinator.autoscale import (
    EVALUATION_ERROR,
    INSUFFICIENT_SAMPLE_DATA,
    SERIES_NAMES,
    AutoscaleInputs,
    AutoscaleResult,
    Sample,
    evaluate,
    parse,
)

NOW = datetime(2024, 3, 4, 12, 0, 0, tzinfo=UTC)
PERIOD = timedelta(seconds=30)


def history(values: list[float], last: datetime = NOW) -> list[Sample]:
    """Samples 30 s apart, oldest first, the newest at ``last``."""
    n = len(values)
    return [Sample(last - (n - 1 - i) * PERIOD, float(v)) for i, v in enumerate(values)]


def run(formula: str, samples: list[Sample] | None = None, **kw: Any) -> AutoscaleResult:
    series = {"CPUPercent": samples} if samples is not None else {}
    return evaluate(parse(formula), AutoscaleInputs(now=kw.pop("now", NOW), series=series, **kw))


def value(expr: str, samples: list[Sample] | None = None, **kw: Any) -> str:
    r = run(f"zz = {expr}", samples, **kw)
    assert r.error is None, r.error
    return dict(p.split("=", 1) for p in r.results.split(";"))["zz"]


TEN_MINUTES = history(list(range(1, 21)))  # 20 samples: (now - 9.5 min) .. now


def test_get_sample_count_returns_the_most_recent_however_old() -> None:
    old = history([4, 5, 6], last=NOW - timedelta(hours=2))
    assert value("$CPUPercent.GetSample(1)", old) == "[6]"
    assert value("$CPUPercent.GetSample(2)", old) == "[5,6]"
    assert value("$CPUPercent.GetSample(2.7)", old) == "[5,6]"
    assert value("$CPUPercent.GetSample(100)", old) == "[4,5,6]"
    assert value("$CPUPercent.GetSample(1)", []) == "[]"
    assert value("max(0, $CPUPercent.GetSample(1))", []) == "0"


def test_get_sample_count_must_be_positive() -> None:
    r = run("x = $CPUPercent.GetSample(0)", TEN_MINUTES)
    assert r.error is not None
    assert r.error[0] == EVALUATION_ERROR
    assert "at least 1" in r.error[1]


def test_time_window_and_sample_percent() -> None:
    assert value("len($CPUPercent.GetSample(TimeInterval_Minute * 10))", TEN_MINUTES) == "20"
    assert value("$CPUPercent.GetSamplePercent(TimeInterval_Minute * 10)", TEN_MINUTES) == "100"
    assert value("$CPUPercent.GetSamplePercent(TimeInterval_Minute * 20)", TEN_MINUTES) == "50"
    assert value("$CPUPercent.GetSample(TimeInterval_Minute * 1)", TEN_MINUTES) == "[19,20]"
    assert (
        value(
            "$CPUPercent.GetSample(TimeInterval_Minute * 0, TimeInterval_Minute * 1)", TEN_MINUTES
        )
        == "[19,20]"
    )


def test_window_between_two_offsets_in_either_order() -> None:
    between = "$CPUPercent.GetSample(1 * TimeInterval_Minute, 6 * TimeInterval_Minute)"
    reversed_ = "$CPUPercent.GetSample(6 * TimeInterval_Minute, 1 * TimeInterval_Minute)"
    assert value(between, TEN_MINUTES) == "[9,10,11,12,13,14,15,16,17,18]"
    assert value(reversed_, TEN_MINUTES) == value(between, TEN_MINUTES)
    timestamps = (
        "$CPUPercent.GetSample(time() - 6 * TimeInterval_Minute, time() - TimeInterval_Minute)"
    )
    assert value(timestamps, TEN_MINUTES) == value(between, TEN_MINUTES)
    assert (
        value(
            "$CPUPercent.GetSamplePercent(TimeInterval_Minute, 6 * TimeInterval_Minute)",
            TEN_MINUTES,
        )
        == "100"
    )


def test_documented_18_of_20_samples_example() -> None:
    eighteen = TEN_MINUTES[:18]  # the last minute of history is missing
    assert value("$CPUPercent.GetSamplePercent(TimeInterval_Minute * 10)", eighteen) == "90"
    assert value("len($CPUPercent.GetSample(TimeInterval_Minute * 10, 80))", eighteen) == "18"
    assert value("len($CPUPercent.GetSample(TimeInterval_Minute * 10))", eighteen) == "18"
    r = run(
        "$TargetDedicatedNodes = 5;\nx = $CPUPercent.GetSample(TimeInterval_Minute * 10, 95)",
        eighteen,
    )
    assert r.error == (
        INSUFFICIENT_SAMPLE_DATA,
        "line 2, column 17: Insufficient data from data set: $CPUPercent wanted 95%, received 90%",
    )
    assert (r.results, r.target_dedicated) == ("", None)  # the whole evaluation failed


def test_fresh_pool_has_too_few_samples() -> None:
    fresh = history([1, 1, 1])
    assert float(value("$CPUPercent.GetSamplePercent(TimeInterval_Minute * 10)", fresh)) < 100
    r = run("x = $CPUPercent.GetSample(TimeInterval_Minute * 10, 95)", fresh)
    assert r.error is not None
    assert r.error[0] == INSUFFICIENT_SAMPLE_DATA
    r = run("x = $CPUPercent.GetSample(TimeInterval_Minute * 10, 10)", [])
    assert r.error is not None
    assert r.error[1].endswith("$CPUPercent wanted 10%, received 0%")


def test_percent_as_second_argument_from_a_variable() -> None:
    # the docs' "initial pool size" example passes (span, ratio)
    formula = (
        "span = TimeInterval_Minute * 10; ratio = 50; x = max($CPUPercent.GetSample(span, ratio))"
    )
    r = run(formula, TEN_MINUTES)
    assert r.error is None
    assert "x=20" in r.results
    r = run("x = $CPUPercent.GetSample(TimeInterval_Minute, TimeInterval_Hour, 200)", TEN_MINUTES)
    assert r.error is not None
    assert "between 0 and 100" in r.error[1]


def test_period_count_and_history_begin_time() -> None:
    assert value("$CPUPercent.GetSamplePeriod()", TEN_MINUTES) == "00:00:30"
    assert (
        value("$CPUPercent.GetSamplePeriod()", TEN_MINUTES, sample_period=timedelta(seconds=5))
        == "00:00:05"
    )
    assert value("$CPUPercent.Count()", TEN_MINUTES) == "20"
    assert value("$CPUPercent.Count()", []) == "0"
    assert value("$CPUPercent.HistoryBeginTime()", TEN_MINUTES) == "2024-03-04T11:50:30.000Z"
    assert value("$CPUPercent.HistoryBeginTime().minute", TEN_MINUTES) == "50"
    r = run("x = $CPUPercent.HistoryBeginTime()", [])
    assert r.error is not None
    assert r.error[0] == INSUFFICIENT_SAMPLE_DATA
    assert "no samples in the history of $CPUPercent" in r.error[1]


def test_future_samples_are_invisible_and_order_does_not_matter() -> None:
    future = history([99, 98], last=NOW + timedelta(minutes=5))
    shuffled = list(reversed(TEN_MINUTES)) + future
    assert value("$CPUPercent.Count()", shuffled) == "20"
    assert value("$CPUPercent.GetSample(2)", shuffled) == "[19,20]"


def test_every_series_variable_and_legacy_alias_reads_its_series() -> None:
    for i, name in enumerate(SERIES_NAMES):
        inputs = AutoscaleInputs(now=NOW, series={name: history([i])})
        r = evaluate(parse(f"x = val(${name}.GetSample(1), 0)"), inputs)
        assert r.error is None
        assert r.results.endswith(f"x={i}")
    inputs = AutoscaleInputs(now=NOW, series={"SampleNodeCount": history([7])})
    r = evaluate(parse("x = max($SampleTVMCount.GetSample(1))"), inputs)
    assert r.results.endswith("x=7")
    r = evaluate(parse("x = $sampletvmcount.GetSample(TimeInterval_Hour, 90)"), inputs)
    assert r.error is not None
    assert "$sampletvmcount wanted 90%" in r.error[1]


PENDING_FORMULA = """
$samples = $PendingTasks.GetSamplePercent(TimeInterval_Minute * 5);
$tasks = $samples < 70 ? max(0, $PendingTasks.GetSample(1)) :
    max($PendingTasks.GetSample(1), avg($PendingTasks.GetSample(TimeInterval_Minute * 5)));
$TargetDedicatedNodes = max(0, min($tasks, 3));
$NodeDeallocationOption = taskcompletion;
"""


def test_hours_of_evaluation_with_an_injected_clock() -> None:
    """Pending tasks rise for an hour then drain: the pool goes 0 -> 3 -> 0."""
    program = parse(PENDING_FORMULA)
    start = NOW
    delay = timedelta(seconds=60)  # samples become visible about a minute late (§5.7)

    def pending(t: datetime) -> float:
        return 10.0 if timedelta(hours=1) <= t - start < timedelta(hours=2) else 0.0

    recorded: list[Sample] = []
    targets: list[int | None] = []
    t = start
    for step in range(4 * 120 + 1):  # four hours, one sample every 30 s
        t = start + step * PERIOD
        recorded.append(Sample(t, pending(t)))
        if step % 30 == 0:  # evaluate every 15 minutes
            visible = [s for s in recorded if s.timestamp <= t - delay]
            r = evaluate(program, AutoscaleInputs(now=t, series={"PendingTasks": visible}))
            assert r.error is None, r.error
            assert r.deallocation_option == "taskcompletion"
            targets.append(r.target_dedicated)
    assert targets[:4] == [0, 0, 0, 0]  # the first hour: nothing pending
    assert targets[5:8] == [3, 3, 3]  # during the second hour: capped at 3
    assert targets[9:] == [0] * (len(targets) - 9)  # drained
