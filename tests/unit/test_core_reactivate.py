"""Pure core: reactivating a failed task (a fresh record, journaled so a restart keeps it active),
the refusals that leave it alone, and the modern job id a schedule's job sends to the agent."""

from __future__ import annotations

import pytest
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from protocol import messages as pm
from tests.unit.test_core_foundation import JOB, _core, _done, _ready_cluster, _runs


def test_a_failed_task_runs_again_and_a_restart_keeps_it_active() -> None:
    core, clock, j = _ready_cluster()
    core.add_task("wi", JOB, m.TaskAdd(name="t", command_line="x"))
    core.add_task("wi", JOB, m.TaskAdd(name="ok", command_line="x"))
    core.schedule()
    runs = dict((spec.task, (agent, spec)) for agent, spec in _runs(j.apply(core.take_effects())))
    for name, code in (("t", 3), ("ok", 0)):
        agent, spec = runs[name]
        _done(core, agent, spec, code=code)
    j.apply(core.take_effects())
    with pytest.raises(ApiError) as ei:
        core.reactivate_task("wi", JOB, "ok")
    assert (ei.value.status, ei.value.code) == (409, "TaskCompletedSuccessfully")
    clock.now += 5
    core.reactivate_task("wi", JOB, "t")
    fx = j.apply(core.take_effects())
    _, task = core.get_task("wi", JOB, "t")
    assert (task.state, task.retry_count, task.exit_code, task.tvm) == ("active", 0, None, None)
    assert task.prev_state == "completed"
    assert task.state_time == clock.now
    # Its old files are deleted on the TVM it ran on; the old completion's row is gone.
    assert any(isinstance(msg, pm.DeleteTaskFiles) for _, msg in map(astuple, fx.sends))
    assert ("taskdone", f"wi/{JOB}/t") not in j.rows
    again, _, _ = _core()
    again.restore(j.load())
    assert again.get_task("wi", JOB, "t")[1].state == "active"
    assert again.get_task("wi", JOB, "ok")[1].state == "completed"
    # It is placed again, and its new result is recorded.
    core.schedule()
    ((agent, spec),) = _runs(core.take_effects())
    assert spec.task == "t"
    _done(core, agent, spec, code=0)
    assert core.get_task("wi", JOB, "t")[1].exit_code == 0


def test_the_terminated_runs_late_result_is_not_the_reactivated_runs() -> None:
    # Terminate answers at once; the killed run's own result reaches the coordinator later, maybe
    # after the task was reactivated and placed again. It must not complete the new run.
    core, _, j = _ready_cluster(n_agents=1)
    core.add_task("wi", JOB, m.TaskAdd(name="t", command_line="x"))
    core.schedule()
    ((agent, old),) = _runs(j.apply(core.take_effects()))
    core.terminate_task("wi", JOB, "t")
    core.reactivate_task("wi", JOB, "t")
    core.schedule()
    ((_, new),) = _runs(j.apply(core.take_effects()))
    assert new.attempt != old.attempt
    _done(core, agent, old, code=137)
    assert core.get_task("wi", JOB, "t")[1].state == "running"
    _done(core, agent, new, code=0)
    task = core.get_task("wi", JOB, "t")[1]
    assert (task.state, task.exit_code) == ("completed", 0)


def test_reactivate_refuses_active_tasks_and_ended_jobs() -> None:
    core, _, j = _ready_cluster(n_agents=1)
    core.add_task("wi", JOB, m.TaskAdd(name="a", command_line="x"))
    core.add_task("wi", JOB, m.TaskAdd(name="b", command_line="x"))
    j.apply(core.take_effects())
    with pytest.raises(ApiError) as ei:
        core.reactivate_task("wi", JOB, "b")
    assert (ei.value.status, ei.value.code) == (409, "TaskNotCompleted")
    core.terminate_task("wi", JOB, "b")
    core.terminate_job("wi", JOB)
    before = core.get_task("wi", JOB, "b")[1]
    with pytest.raises(ApiError) as ei:
        core.reactivate_task("wi", JOB, "b")
    assert ei.value.status == 409
    assert core.get_task("wi", JOB, "b")[1] is before
    assert before.state == "completed"


def test_a_schedules_job_sends_its_modern_id() -> None:
    core, _, j = _ready_cluster()
    core.add_workitem(
        m.WorkitemAdd(
            name="s",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            schedule=m.Schedule(recurrence_interval="PT1H"),
        )
    )
    core.tick()
    core.add_task("s", JOB, m.TaskAdd(name="t", command_line="x"))
    core.add_task("wi", JOB, m.TaskAdd(name="t", command_line="x"))
    core.schedule()
    ids = {spec.workitem: spec.job_id for _, spec in _runs(core.take_effects())}
    assert ids == {"s": "s:job-1", "wi": ""}  # empty: the agent uses the workitem's name
