"""Tasks placed into agents' queues (coordinator/core/scheduler.py): only on agents that keep one,
only for jobs of short tasks once the free slots are taken, never while anything else waits in the
pool; a task handed back unstarted runs again without using a retry, and its job is queued no more."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from coordinator.core.freeslots import QUEUE_PER_SLOT
from coordinator.rest.azure.views import node_view
from coordinator.rest.views import tvm_view
from protocol import messages as pm
from tests.unit.test_core_tasks import Clock

JOB = "job-0000000001"
SLOTS = 2


def _core(queues: bool = True, tvms: int = 1) -> CoordinatorState:
    core = CoordinatorState("acct", clock=Clock())
    caps = [pm.TASK_QUEUE] if queues else []
    for i in range(tvms):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t", capabilities=caps))
    core.add_pool(
        m.PoolAdd(name="p", target_dedicated=tvms, max_tasks_per_vm=SLOTS, vm_size="large")
    )
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    return core


def _workitem(core: CoordinatorState, name: str, **kw: object) -> None:
    core.add_workitem(
        m.WorkitemAdd(
            name=name,
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            **kw,  # type: ignore[arg-type]
        )
    )


def _add(core: CoordinatorState, wi: str, n: int, prefix: str = "t", **kw: object) -> None:
    core.add_tasks(
        wi,
        JOB,
        [m.TaskAdd(name=f"{prefix}{i}", command_line="run", **kw) for i in range(n)],  # type: ignore[arg-type]
    )


def _started(core: CoordinatorState) -> list[pm.TaskSpec]:
    core.schedule()
    return [s.msg.spec for s in core.take_effects().sends if isinstance(s.msg, pm.RunTask)]


def _done(core: CoordinatorState, spec: pm.TaskSpec, ran: float = 0.002, **kw: object) -> None:
    _, t = core.get_task(*spec.key.split("/"))
    core.agent_message(
        core.tvms[t.tvm].rec.agent_id,
        pm.TaskCompleted(
            key=spec.key,
            attempt=spec.attempt,
            exit_code=0,
            start_time=100.0,
            end_time=100.0 + ran,
            **kw,  # type: ignore[arg-type]
        ),
    )


def _short_job(core: CoordinatorState, wi: str, n: int) -> list[pm.TaskSpec]:
    """Workitem `wi` with `n` tasks, its first ones started and one ended after 2 ms: a job of
    short tasks. Returns the first started."""
    _workitem(core, wi)
    _add(core, wi, n)
    first = _started(core)
    _done(core, first[0])
    return first


def _on_tvm(core: CoordinatorState) -> int:
    return sum(len(t.running) for t in core.tvms.values())


def test_a_job_of_short_tasks_fills_the_queue_of_an_agent_that_keeps_one() -> None:
    core = _core()
    _workitem(core, "wi")
    _add(core, "wi", 20)
    first = _started(core)
    assert len(first) == SLOTS  # how long its tasks run is not known yet: slots only
    assert all(s.slots == 1 for s in first)
    _done(core, first[0])  # 2 ms: a short task
    more = _started(core)
    assert len(more) == 1 + SLOTS * QUEUE_PER_SLOT  # the freed slot, then the agent's queue
    assert _on_tvm(core) == SLOTS + SLOTS * QUEUE_PER_SLOT
    tvm = next(iter(core.tvms.values()))
    assert tvm.free < 0
    assert tvm.rec.state == "running"
    # Both APIs show them running there; the slots in use stay the TVM's slots.
    node = node_view(core, "http://x", tvm)
    assert node["runningTasksCount"] == SLOTS + SLOTS * QUEUE_PER_SLOT
    assert node["runningTaskSlotsCount"] == SLOTS
    view = tvm_view(core, tvm)
    assert (view.running_tasks_count, view.running_task_slots_count) == (
        SLOTS + SLOTS * QUEUE_PER_SLOT,
        SLOTS,
    )
    assert _started(core) == []  # full: nothing more until something ends


@pytest.mark.parametrize(
    ("queues", "ran"),
    [(False, 0.002), (True, 2.0)],
    ids=["an agent without a queue", "long tasks"],
)
def test_only_slots_are_filled(queues: bool, ran: float) -> None:
    core = _core(queues=queues)
    _workitem(core, "wi")
    _add(core, "wi", 20)
    first = _started(core)
    _done(core, first[0], ran=ran)
    assert len(_started(core)) == 1
    assert _on_tvm(core) == SLOTS


def test_nothing_is_queued_while_another_job_waits_in_the_pool() -> None:
    # A job that is not known to be short (here: just added) must get the slots as they free, in
    # priority order, not find them taken by queued tasks of a short job.
    core = _core()
    _short_job(core, "short", 20)
    _workitem(core, "other", priority=100)
    _add(core, "other", 5)
    placed = _started(core)
    assert [s.workitem for s in placed] == ["other"]  # the freed slot, to the higher priority
    assert _on_tvm(core) == SLOTS


def test_wide_tasks_and_jobs_with_a_preparation_are_not_queued() -> None:
    core = _core()
    _workitem(core, "wide")
    _add(core, "wide", 4, required_slots=2)
    (first,) = _started(core)
    assert first.slots == 2  # the agent counts what the coordinator counts
    _done(core, first)
    assert len(_started(core)) == 1
    assert _on_tvm(core) == 1

    core = _core()
    _workitem(core, "prep", job_preparation_task=m.JobPreparationTask(command_line="true"))
    _add(core, "prep", 20)
    specs = _started(core)
    prep = [s for s in specs if s.kind == "jobprep"]
    assert prep
    assert all(s.slots == 0 for s in prep)


def test_a_task_handed_back_from_a_queue_runs_again_without_a_retry_and_its_job_is_queued_no_more() -> (
    None
):
    core = _core()
    _short_job(core, "wi", 20)
    queued = _started(core)[-1]
    failure = pm.Failure(category="ServerError", code=pm.QUEUE_HANDED_BACK, message="waited")
    _done(core, queued, ran=1.0, failure=failure)
    _, task = core.get_task(*queued.key.split("/"))
    assert task.state == "active"
    assert task.retry_count == 0
    assert task.tvm is None
    tvm = next(iter(core.tvms.values()))
    # Its job is no longer queued: as the others end, only real slots are filled, its turn first.
    placed: list[pm.TaskSpec] = []
    while not placed:
        key = next(iter(tvm.running))
        _, t = core.get_task(*key.split("/"))
        _done(
            core,
            pm.TaskSpec(key=key, attempt=t.attempt, command_line="", workitem="", job="", task=""),
        )
        placed = _started(core)
    assert [s.key for s in placed] == [queued.key]
    assert len(tvm.running) == SLOTS


def test_a_job_manager_that_waits_stops_the_queueing_in_its_pool() -> None:
    core = _core()
    _short_job(core, "wi", 40)
    assert len(_started(core)) == 1 + SLOTS * QUEUE_PER_SLOT
    _workitem(
        core,
        "managed",
        job_manager=m.JobManager(name="jm", command_line="true", run_exclusive=False),
    )
    tvm = next(iter(core.tvms.values()))
    for _ in range(SLOTS * (QUEUE_PER_SLOT + 1)):
        key = next(k for k in tvm.running if k.startswith("wi/"))
        _, t = core.get_task(*key.split("/"))
        _done(
            core,
            pm.TaskSpec(key=key, attempt=t.attempt, command_line="", workitem="", job="", task=""),
        )
        placed = _started(core)
        if any(s.job_manager for s in placed):
            break
        assert placed == []  # the queue drains: nothing refills it while the manager waits
    else:
        raise AssertionError("the job manager never got a slot")
    _, jm = core.get_task("managed", JOB, "jm")
    assert jm.state == "running"
    assert jm.tvm == tvm.rec.name


def test_a_restarted_job_manager_makes_room_on_a_tvm_whose_queue_is_full() -> None:
    core = _core(tvms=2)
    clock = core.clock
    _workitem(
        core,
        "managed",
        job_manager=m.JobManager(name="jm", command_line="true", run_exclusive=False),
    )
    assert [s.job_manager for s in _started(core)] == [True]
    _short_job(core, "s", 60)
    _started(core)
    _, jm = core.get_task("managed", JOB, "jm")
    home = core.tvms[jm.tvm]
    other = next(t for t in core.tvms.values() if t is not home)
    assert other.free < 0  # its slots taken and its queue full
    core.agent_disconnected(home.rec.agent_id)
    clock.now += 11  # type: ignore[attr-defined]
    core.agent_message(other.rec.agent_id, pm.Heartbeat())
    core.tick()
    core.schedule()
    _, jm = core.get_task("managed", JOB, "jm")
    assert jm.state == "running"
    assert jm.tvm == other.rec.name
    # Room for it: the queued tasks went back (its agent answers them unstarted), one slot freed.
    assert other.free == 0
    assert sum(1 for k in other.running if k.startswith("s/")) == SLOTS - 1
