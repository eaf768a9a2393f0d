"""Workitem schedules (pure): when the next job of a workitem is due.

A schedule is doNotRunUntil (first occurrence; absent = when the workitem is added), doNotRunAfter
(no occurrence after it), startWindow (how long after its time an occurrence may still start;
absent = unlimited) and recurrenceInterval (absent = run once). At most one job of a workitem is
active at a time: an occurrence that falls due while a job still runs waits for it, and is skipped
if its start window closes first. Occurrences that a later one supersedes while waiting are
skipped too (there is only ever one pending occurrence — the latest one that is due).

The caller keeps one number per workitem, `next_run` (the time of the next occurrence not yet used,
None when no more are due), and asks `decide()` on every tick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator.common import models as m
from coordinator.common.errors import bad_request
from coordinator.common.timeutil import parse_duration, parse_time

MIN_RECURRENCE_S = 60.0
MIN_START_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Plan:
    """A schedule in seconds since the epoch / seconds."""

    not_before: float | None = None
    not_after: float | None = None
    start_window: float | None = None
    recurrence: float | None = None

    def first_run(self, now: float) -> float | None:
        """`next_run` for a workitem added (or re-scheduled) at `now`."""
        first = max(now, self.not_before) if self.not_before is not None else now
        if self.not_after is not None and first > self.not_after:
            return None
        return first


@dataclass(frozen=True, slots=True)
class Decision:
    create: bool  # create a job now
    next_run: float | None  # the workitem's new next_run
    skipped: int = 0  # occurrences given up (missed start window or superseded)


def parse_schedule(s: m.Schedule | None) -> Plan:
    """Validate and convert a REST schedule; 400 naming the field on bad input."""
    if s is None:
        return Plan()
    not_before = (
        parse_time(s.do_not_run_until, "schedule.doNotRunUntil") if s.do_not_run_until else None
    )
    not_after = (
        parse_time(s.do_not_run_after, "schedule.doNotRunAfter") if s.do_not_run_after else None
    )
    if not_before is not None and not_after is not None and not_after < not_before:
        raise bad_request(
            "InvalidPropertyValue",
            "schedule.doNotRunAfter must not be earlier than schedule.doNotRunUntil",
            field="schedule.doNotRunAfter",
        )
    window = parse_duration(s.start_window, "schedule.startWindow") if s.start_window else None
    if window is not None and window < MIN_START_WINDOW_S:
        raise bad_request(
            "InvalidPropertyValue",
            f"schedule.startWindow must be at least 1 minute (PT1M), got {s.start_window}",
            field="schedule.startWindow",
        )
    recurrence = (
        parse_duration(s.recurrence_interval, "schedule.recurrenceInterval")
        if s.recurrence_interval
        else None
    )
    if recurrence is not None and recurrence < MIN_RECURRENCE_S:
        raise bad_request(
            "InvalidPropertyValue",
            "schedule.recurrenceInterval must be at least 1 minute "
            f"(PT1M), got {s.recurrence_interval}",
            field="schedule.recurrenceInterval",
        )
    return Plan(not_before, not_after, window, recurrence)


def _after(plan: Plan, t: float) -> float | None:
    """The occurrence after the one at `t`, if any is still allowed."""
    if plan.recurrence is None:
        return None
    nxt = t + plan.recurrence
    if plan.not_after is not None and nxt > plan.not_after:
        return None
    return nxt


def decide(plan: Plan, next_run: float | None, now: float, job_active: bool) -> Decision:
    """What to do at `now` for a workitem whose next unused occurrence is `next_run`."""
    if next_run is None or now < next_run:
        return Decision(False, next_run)
    occ = next_run
    skipped = 0
    if plan.recurrence is not None:
        # Only the latest occurrence that is due can still start; earlier ones are superseded.
        k = math.floor((now - next_run) / plan.recurrence)
        if plan.not_after is not None:
            k = min(k, math.floor((plan.not_after - next_run) / plan.recurrence))
        occ = next_run + max(k, 0) * plan.recurrence
        skipped = max(k, 0)
    if plan.not_after is not None and occ > plan.not_after:
        return Decision(False, None, skipped)
    if plan.start_window is not None and now >= occ + plan.start_window:
        return Decision(False, _after(plan, occ), skipped + 1)  # window missed: skip it
    if job_active:
        return Decision(False, occ, skipped)  # wait for the running job (within the window)
    return Decision(True, _after(plan, occ), skipped)
