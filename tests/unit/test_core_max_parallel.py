"""maxParallelTasks in the pure core: a job runs at most that many tasks at once however many slots
are free (its job manager not counted), other jobs take the slots it leaves, a completion lets the
next one start, an update takes effect at the next placement, and bad values are refused."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState
from protocol import messages as pm
from tests.unit.test_core_tasks import Clock

JOB = "job-0000000001"


def _core() -> CoordinatorState:
    """Two TVMs with four slots each: eight free slots."""
    core = CoordinatorState("acct", clock=Clock())
    for i in range(2):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2, max_tasks_per_vm=4, vm_size="large"))
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    return core


def _workitem(core: CoordinatorState, name: str, cap: int = -1, **kw: object) -> None:
    core.add_workitem(
        m.WorkitemAdd(
            name=name,
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            max_parallel_tasks=cap,
            **kw,  # type: ignore[arg-type]
        )
    )


def _add(core: CoordinatorState, wi: str, n: int) -> None:
    core.add_tasks(wi, JOB, [m.TaskAdd(name=f"t{i}", command_line="run") for i in range(n)])


def _started(core: CoordinatorState) -> list[pm.TaskSpec]:
    core.schedule()
    return [
        spec
        for send in core.take_effects().sends
        if isinstance(send.msg, pm.RunTask)
        for spec in [send.msg.spec]
    ]


def _running(core: CoordinatorState, wi: str) -> int:
    return core.get_job(wi, JOB).tally.running


def _complete(core: CoordinatorState, spec: pm.TaskSpec) -> None:
    _, t = core.get_task(*spec.key.split("/"))
    core.agent_message(
        core.tvms[t.tvm].rec.agent_id,
        pm.TaskCompleted(
            key=spec.key, attempt=spec.attempt, exit_code=0, start_time=1.0, end_time=2.0
        ),
    )


def test_a_job_runs_at_most_max_parallel_tasks_and_others_take_the_rest() -> None:
    core = _core()
    _workitem(core, "capped", cap=3)
    _workitem(core, "free")
    _add(core, "capped", 10)
    _add(core, "free", 10)
    started = _started(core)
    assert len(started) == 8  # every slot used
    assert _running(core, "capped") == 3
    assert _running(core, "free") == 5
    # A completion of the capped job lets exactly one more of it start.
    capped = [s for s in started if s.key.startswith("capped/")]
    _complete(core, capped[0])
    more = _started(core)
    assert [s.key.split("/")[0] for s in more] == ["capped"]
    assert _running(core, "capped") == 3
    # A completion of the other job frees a slot the capped job may not take.
    free = [s for s in started if s.key.startswith("free/")]
    _complete(core, free[0])
    assert [s.key.split("/")[0] for s in _started(core)] == ["free"]
    assert _running(core, "capped") == 3


def test_update_takes_effect_at_the_next_placement() -> None:
    core = _core()
    _workitem(core, "wi", cap=1)
    _add(core, "wi", 6)
    assert len(_started(core)) == 1
    assert core.get_job("wi", JOB).rec.max_parallel == 1
    core.update_job("wi", JOB, m.JobUpdate(max_parallel_tasks=4))
    assert len(_started(core)) == 3
    assert _running(core, "wi") == 4
    core.update_job("wi", JOB, m.JobUpdate(max_parallel_tasks=-1))
    assert len(_started(core)) == 2  # the last two: no limit
    core.update_job("wi", JOB, m.JobUpdate(priority=5))  # absent: unchanged
    assert core.get_job("wi", JOB).rec.max_parallel == -1


def test_the_job_manager_is_not_counted() -> None:
    core = _core()
    jm = m.JobManager(name="jm", command_line="run", run_exclusive=False)
    _workitem(core, "wi", cap=1, job_manager=jm)
    started = _started(core)
    assert [s.key for s in started] == [f"wi/{JOB}/jm"]
    _add(core, "wi", 3)
    assert len(_started(core)) == 1  # one task beside its running manager
    assert _running(core, "wi") == 2


@pytest.mark.parametrize("bad", [0, -2, True])
def test_bad_values_refused_with_nothing_changed(bad: object) -> None:
    core = _core()
    with pytest.raises(ApiError) as exc:
        _workitem(core, "wi", cap=bad)  # type: ignore[arg-type]
    assert (exc.value.status, exc.value.code) == (400, "InvalidPropertyValue")
    assert exc.value.values.get("field") == "maxParallelTasks"
    assert "wi" not in core.workitems
    _workitem(core, "ok", cap=2)
    with pytest.raises(ApiError):
        core.update_job("ok", JOB, m.JobUpdate(max_parallel_tasks=bad))  # type: ignore[arg-type]
    assert core.get_job("ok", JOB).rec.max_parallel == 2


def test_a_workitem_update_applies_to_its_later_jobs() -> None:
    core = _core()
    _workitem(core, "wi", cap=2)
    core.update_workitem("wi", m.WorkitemUpdate(max_parallel_tasks=5))
    assert core.workitems["wi"].spec.max_parallel_tasks == 5
    assert core.get_job("wi", JOB).rec.max_parallel == 2  # the job made before keeps its own
    with pytest.raises(ApiError) as exc:
        core.update_workitem("wi", m.WorkitemUpdate(max_parallel_tasks=0))
    assert exc.value.values.get("field") == "maxParallelTasks"
    assert core.workitems["wi"].spec.max_parallel_tasks == 5


def test_the_limit_survives_a_restart() -> None:
    """Kept in the job's and the workitem's journaled records: a restored coordinator has them."""
    from tests.unit.test_core_foundation import Journal

    core = _core()
    journal = Journal()
    journal.apply(core.take_effects())
    _workitem(core, "wi", cap=2)
    core.update_job("wi", JOB, m.JobUpdate(max_parallel_tasks=3))
    core.update_workitem("wi", m.WorkitemUpdate(max_parallel_tasks=4))
    journal.apply(core.take_effects())
    fresh = CoordinatorState("acct", clock=Clock())
    fresh.restore(journal.load())
    assert fresh.get_job("wi", JOB).rec.max_parallel == 3
    assert fresh.workitems["wi"].spec.max_parallel_tasks == 4
