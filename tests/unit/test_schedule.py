"""Issue 6: workitem schedules, pure (coordinator/core/schedules.py)."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.common.timeutil import rfc3339
from coordinator.core.schedules import Plan, decide, parse_schedule

T0 = 1_700_000_000.0


def test_parse_converts_times_and_durations() -> None:
    plan = parse_schedule(
        m.Schedule(
            do_not_run_until=rfc3339(T0),
            do_not_run_after=rfc3339(T0 + 3600),
            start_window="PT5M",
            recurrence_interval="PT1M",
        )
    )
    assert plan == Plan(T0, T0 + 3600, 300.0, 60.0)
    assert parse_schedule(None) == Plan()


@pytest.mark.parametrize(
    ("sched", "field"),
    [
        (m.Schedule(recurrence_interval="PT59S"), "schedule.recurrenceInterval"),
        (m.Schedule(recurrence_interval="PT0S"), "schedule.recurrenceInterval"),
        (m.Schedule(recurrence_interval="soon"), "schedule.recurrenceInterval"),
        (m.Schedule(start_window="PT10S"), "schedule.startWindow"),
        (
            m.Schedule(do_not_run_until=rfc3339(T0), do_not_run_after=rfc3339(T0 - 1)),
            "schedule.doNotRunAfter",
        ),
        (m.Schedule(do_not_run_until="yesterday"), "schedule.doNotRunUntil"),
    ],
)
def test_bad_schedules_name_the_field(sched: m.Schedule, field: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_schedule(sched)
    assert exc.value.status == 400
    assert exc.value.values["field"] == field


def test_first_run_waits_for_do_not_run_until() -> None:
    assert Plan(not_before=T0 + 50).first_run(T0) == T0 + 50
    assert Plan(not_before=T0 - 50).first_run(T0) == T0
    assert Plan().first_run(T0) == T0
    assert Plan(not_after=T0 - 1).first_run(T0) is None  # already over: nothing will ever run


def test_single_run_is_created_once() -> None:
    d = decide(Plan(), T0, T0, job_active=False)
    assert d.create
    assert d.next_run is None
    assert not decide(Plan(), None, T0 + 1000, job_active=False).create


def test_not_due_yet() -> None:
    d = decide(Plan(recurrence=60), T0 + 10, T0, job_active=False)
    assert not d.create
    assert d.next_run == T0 + 10


def test_recurrence_creates_one_per_interval() -> None:
    plan = Plan(recurrence=60)
    nxt: float | None = T0
    created = []
    for now in range(int(T0), int(T0) + 185, 5):
        d = decide(plan, nxt, float(now), job_active=False)
        nxt = d.next_run
        if d.create:
            created.append(now - T0)
    assert created == [0, 60, 120, 180]


def test_running_job_delays_next_within_window() -> None:
    plan = Plan(recurrence=60, start_window=120)
    d = decide(plan, T0 + 60, T0 + 70, job_active=True)
    assert not d.create
    assert d.next_run == T0 + 60
    d = decide(plan, T0 + 60, T0 + 100, job_active=False)
    assert d.create
    assert d.next_run == T0 + 120


def test_missed_window_is_skipped() -> None:
    plan = Plan(recurrence=600, start_window=60)
    d = decide(plan, T0, T0 + 61, job_active=True)
    assert not d.create
    assert d.next_run == T0 + 600
    assert d.skipped == 1
    # Also when nothing blocks (e.g. the workitem was disabled through the window).
    d = decide(plan, T0, T0 + 70, job_active=False)
    assert not d.create
    assert d.next_run == T0 + 600


def test_only_latest_due_occurrence_runs() -> None:
    plan = Plan(recurrence=60)
    d = decide(plan, T0, T0 + 200, job_active=False)  # occurrences at 0, 60, 120, 180 are due
    assert d.create
    assert d.next_run == T0 + 240
    assert d.skipped == 3


def test_do_not_run_after_ends_the_schedule() -> None:
    plan = Plan(recurrence=60, not_after=T0 + 130)
    d = decide(plan, T0 + 120, T0 + 120, job_active=False)
    assert d.create
    assert d.next_run is None
    d = decide(
        plan, T0 + 60, T0 + 500, job_active=False
    )  # long after: the last allowed one (120) runs
    assert d.create
    assert d.next_run is None
    d = decide(Plan(recurrence=60, not_after=T0 + 10), T0 + 60, T0 + 60, job_active=False)
    assert not d.create
    assert d.next_run is None
