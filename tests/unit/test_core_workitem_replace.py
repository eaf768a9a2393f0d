"""Replacing a workitem's whole specification (a job schedule's PUT/PATCH): later jobs use it,
jobs already made keep theirs, a changed schedule starts afresh, bad input changes nothing."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.common import models as m
from coordinator.common.timeutil import rfc3339
from coordinator.core import CoordinatorState
from tests.unit.test_core_jobs import J1, _core, _jobs, _refused, _wi


def _spec(core: CoordinatorState, name: str = "wi") -> m.WorkitemAdd:
    return core.get_workitem(name).spec


def test_replace_applies_to_later_jobs_only() -> None:
    core, clock = _core()
    _wi(core, schedule=m.Schedule(recurrence_interval="PT1M"), priority=1)
    assert _jobs(core) == [(J1, "active")]
    jm = m.JobManager(name="jm", command_line="run", kill_job_on_completion=False)
    new = msgspec.structs.replace(_spec(core), priority=9, job_manager=jm)
    core.replace_workitem("wi", new)
    assert core.take_effects().writes  # journaled
    assert core.get_job("wi", J1).rec.priority == 1  # the job already made keeps its settings
    assert core.get_job("wi", J1).rec.jm_name is None
    core.terminate_job("wi", J1)
    for _ in range(15):
        clock.now += 5
        core.tick()
    job2 = core.get_job("wi", "job-0000000002")
    assert job2.rec.priority == 9
    assert job2.rec.jm_name == "jm"
    assert "jm" in job2.tasks


def test_a_changed_schedule_starts_afresh_and_an_unchanged_one_keeps_its_next_run() -> None:
    core, clock = _core()
    _wi(core, schedule=m.Schedule(recurrence_interval="PT1H"))
    first = core.get_workitem("wi").next_run
    clock.now += 30
    core.replace_workitem("wi", msgspec.structs.replace(_spec(core), priority=5))
    assert core.get_workitem("wi").next_run == first
    later = rfc3339(clock.now + 600)
    sched = m.Schedule(do_not_run_until=later, recurrence_interval="P1D")
    core.replace_workitem("wi", msgspec.structs.replace(_spec(core), schedule=sched))
    assert core.get_workitem("wi").next_run == pytest.approx(clock.now + 600)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"priority": 5000}, "InvalidPropertyValue"),
        ({"schedule": None}, "InvalidPropertyValue"),
        ({"name": "other"}, "InvalidPropertyValue"),
        ({"schedule": m.Schedule(recurrence_interval="PT10S")}, "InvalidPropertyValue"),
        (
            {"job_execution_environment": m.JobExecutionEnvironment(pool_name="")},
            "MissingRequiredProperty",
        ),
    ],
)
def test_bad_replacements_change_nothing(change: dict, code: str) -> None:
    core, _ = _core()
    _wi(core, schedule=m.Schedule(recurrence_interval="PT1H"), priority=1)
    before = _spec(core)
    bad = msgspec.structs.replace(before, **change)
    _refused(core, core.replace_workitem, "wi", bad, status=400, code=code)
    assert _spec(core) is before


def test_an_ended_workitem_cannot_be_replaced() -> None:
    core, _ = _core()
    _wi(core, schedule=m.Schedule(recurrence_interval="PT1H"))
    core.terminate_workitem("wi")
    spec = _spec(core)
    _refused(core, core.replace_workitem, "wi", spec, status=409, code="WorkItemBeingTerminated")
    _refused(core, core.replace_workitem, "nope", spec, status=404, code="WorkItemNotFound")


def test_a_replaced_specification_survives_a_restart() -> None:
    core, clock = _core()
    _wi(core, schedule=m.Schedule(recurrence_interval="PT1H"), azure={"displayName": "a"})
    new = msgspec.structs.replace(
        _spec(core),
        priority=3,
        schedule=m.Schedule(recurrence_interval="P1D"),
        azure={"displayName": "b", "jobMetadata": [{"name": "k", "value": "v"}]},
    )
    core.replace_workitem("wi", new)
    rows = {(w.kind, w.key): w.body for w in core.take_effects().writes if w.body is not None}
    restored = CoordinatorState("acct", clock=clock)
    restored.restore((k, key, body) for (k, key), body in rows.items())
    wi = restored.get_workitem("wi")
    assert wi.spec == new
    assert wi.next_run == pytest.approx(clock.now)
