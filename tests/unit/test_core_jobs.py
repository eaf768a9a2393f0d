"""Issue 6, pure core: schedules, priorities, job constraints and operations, job managers.

No I/O: the core is driven with agent events and a fake clock; effects are inspected directly.
"""

from __future__ import annotations

import pytest
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.common.timeutil import rfc3339
from coordinator.core import WALL_CLOCK_EXIT_CODE, CoordinatorState
from protocol import messages as pm


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _core(n_agents: int = 1, slots: int = 1) -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    core = CoordinatorState(
        "acct", clock=clock, heartbeat_timeout=10.0, account_url="http://coord:1"
    )
    for i in range(n_agents):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t", cores=4))
    core.add_pool(
        m.PoolAdd(name="p", target_dedicated=n_agents, max_tasks_per_vm=slots, vm_size="large")
    )
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    return core, clock


def _wi(core: CoordinatorState, name: str = "wi", **kw: object) -> None:
    core.add_workitem(
        m.WorkitemAdd(
            name=name, job_execution_environment=m.JobExecutionEnvironment(pool_name="p"), **kw
        )
    )  # type: ignore[arg-type]


J1 = "job-0000000001"


def _add(core: CoordinatorState, wi: str, names: list[str], job: str = J1) -> None:
    for n in names:
        core.add_task(wi, job, m.TaskAdd(name=n, command_line="run"))


def _runs(core: CoordinatorState) -> list[pm.TaskSpec]:
    core.schedule()
    return [
        msg.spec
        for _, msg in map(astuple, core.take_effects().sends)
        if isinstance(msg, pm.RunTask)
    ]


def _complete(core: CoordinatorState, spec: pm.TaskSpec, code: int = 0) -> None:
    wi, job, name = spec.key.split("/")
    _, t = core.get_task(wi, job, name)
    agent = core.tvms[t.tvm].rec.agent_id  # type: ignore[index]
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key,
            attempt=spec.attempt,
            exit_code=code,
            start_time=core.clock(),
            end_time=core.clock(),
        ),
    )


def _refused(core: CoordinatorState, fn: object, *args: object, status: int, code: str) -> ApiError:
    core.take_effects()
    with pytest.raises(ApiError) as exc:
        fn(*args)  # type: ignore[operator]
    assert (exc.value.status, exc.value.code) == (status, code), exc.value.message
    assert core.take_effects().writes == []  # nothing stored
    return exc.value


def _tick(core: CoordinatorState, clock: Clock, dt: float = 0.0) -> None:
    """Time passes; every agent stays alive (heartbeats just before the tick)."""
    clock.now += dt
    for a in core.agents.values():
        if a.connected:
            core.agent_message(a.agent_id, pm.Heartbeat())
    core.tick()


def _jobs(core: CoordinatorState, wi: str = "wi") -> list[tuple[str, str]]:
    return sorted((j.rec.name, j.rec.state) for j in core.workitem_jobs(wi))


# ---------------------------------------------------------------------------- schedules


def test_one_minute_recurrence_makes_job_1_2_3_in_order() -> None:
    core, clock = _core()
    t0 = clock.now
    _wi(
        core,
        schedule=m.Schedule(recurrence_interval="PT1M", do_not_run_after=rfc3339(t0 + 150)),
        on_all_tasks_complete="terminatejob",
    )
    assert _jobs(core) == [(J1, "active")]
    created_at = {J1: 0.0}
    for _ in range(40):  # 200 s in 5 s ticks
        clock.now += 5
        core.tick()
        for j in core.workitem_jobs("wi"):
            created_at.setdefault(j.rec.name, j.rec.created - t0)
    # A job with no tasks and terminatejob completes at once, so each occurrence runs on time.
    assert created_at == {J1: 0.0, "job-0000000002": 60.0, "job-0000000003": 120.0}
    assert _jobs(core) == [
        (J1, "completed"),
        ("job-0000000002", "completed"),
        ("job-0000000003", "completed"),
    ]
    wi = core.get_workitem("wi")
    assert wi.state == "completed"
    assert wi.next_run is None
    assert wi.recent_job == "job-0000000003"


def test_do_not_run_until_delays_the_first_job() -> None:
    core, clock = _core()
    _wi(core, schedule=m.Schedule(do_not_run_until=rfc3339(clock.now + 90)))
    assert _jobs(core) == []
    clock.now += 60
    core.tick()
    assert _jobs(core) == []
    clock.now += 31
    core.tick()
    assert _jobs(core) == [(J1, "active")]


def test_running_job_delays_the_next_and_missed_window_skips() -> None:
    core, clock = _core()
    _wi(core, schedule=m.Schedule(recurrence_interval="PT10M", start_window="PT2M"))
    _add(core, "wi", ["long"])
    spec = _runs(core)[0]
    _tick(core, clock, 601)  # occurrence 2 is due, job-1 still runs
    assert [n for n, _ in _jobs(core)] == [J1]
    _tick(core, clock, 60)  # still inside the 2-minute window: job-1 ends, job-2 starts late
    _complete(core, spec)
    core.terminate_job("wi", J1, None)
    _tick(core, clock)
    assert [n for n, _ in _jobs(core)] == [J1, "job-0000000002"]
    assert core.get_workitem("wi").next_run == pytest.approx(
        core.get_job("wi", J1).rec.created + 1200
    )
    # Occurrence 3 (t=1200) passes its window while job-2 runs: skipped; occurrence 4 runs.
    _add(core, "wi", ["x"], job="job-0000000002")
    spec2 = _runs(core)[0]
    _tick(core, clock, core.get_job("wi", J1).rec.created + 1200 + 121 - clock.now)
    assert core.get_workitem("wi").next_run == pytest.approx(
        core.get_job("wi", J1).rec.created + 1800
    )
    _complete(core, spec2)
    core.terminate_job("wi", "job-0000000002", None)
    _tick(core, clock)
    assert [n for n, _ in _jobs(core)] == [J1, "job-0000000002"]
    _tick(core, clock, core.get_job("wi", J1).rec.created + 1800 - clock.now)
    assert [n for n, _ in _jobs(core)][-1] == "job-0000000003"


def test_workitem_without_schedule_completes_with_its_job() -> None:
    core, clock = _core()
    _wi(core)
    assert core.get_workitem("wi").state == "active"
    core.terminate_job("wi", J1, "done")
    core.tick()
    assert core.get_job("wi", J1).rec.state == "completed"
    assert core.get_workitem("wi").state == "completed"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"priority": 1001}, "priority"),
        ({"priority": -1001}, "priority"),
        ({"schedule": m.Schedule(recurrence_interval="PT30S")}, "schedule.recurrenceInterval"),
        (
            {
                "schedule": m.Schedule(
                    do_not_run_until="2030-01-02T00:00:00Z", do_not_run_after="2030-01-01T00:00:00Z"
                )
            },
            "schedule.doNotRunAfter",
        ),
        ({"on_all_tasks_complete": "explode"}, "onAllTasksComplete"),
        ({"job_manager": m.JobManager(name="jm", command_line="  ")}, "jobManager.commandLine"),
        ({"job_manager": m.JobManager(name="bad name", command_line="x")}, "jobManager.name"),
    ],
)
def test_bad_workitems_are_refused_and_nothing_stored(kw: dict, field: str) -> None:
    core, _ = _core()
    err = _refused(
        core,
        lambda: _wi(core, **kw),
        status=400,
        code="InvalidPropertyValue"
        if field != "jobManager.commandLine"
        else "MissingRequiredProperty",
    )
    assert err.values["field"] == field
    assert core.workitems == {}
    assert core.jobs == {}


# ---------------------------------------------------------------------------- priorities


def test_higher_priority_job_placed_first_on_one_slot() -> None:
    core, _ = _core()
    _wi(core, "low", priority=0)
    _add(core, "low", ["l1", "l2"])
    _wi(core, "high", priority=500)
    _add(core, "high", ["h1", "h2"])
    order = []
    for _ in range(4):
        (spec,) = _runs(core)
        order.append(spec.task)
        _complete(core, spec)
    assert order == ["h1", "h2", "l1", "l2"]


def test_equal_priority_is_fair_and_running_tasks_are_not_preempted() -> None:
    core, _ = _core()
    _wi(core, "a")
    _add(core, "a", ["a1", "a2", "a3"])
    (first,) = _runs(core)
    assert first.task == "a1"
    _wi(core, "b")
    _add(core, "b", ["b1", "b2"])
    _wi(core, "c", priority=900)  # higher priority arrives while a1 runs: a1 keeps running
    assert _runs(core) == []
    _, a1 = core.get_task("a", J1, "a1")
    assert a1.state == "running"
    _complete(core, first)
    order = []
    while specs := _runs(core):
        order.append(specs[0].task)
        _complete(core, specs[0])
    assert order == ["b1", "a2", "b2", "a3"]  # a was served last (a1): b goes next


def test_priority_update_reorders_waiting_tasks() -> None:
    core, _ = _core()
    _wi(core, "x")
    _wi(core, "y")
    core.take_effects()
    core.update_job("y", J1, m.JobUpdate(priority=10))
    assert core.get_job("y", J1).rec.priority == 10
    core.update_workitem("x", m.WorkitemUpdate(priority=-5))  # applies to later jobs only
    assert core.get_workitem("x").spec.priority == -5
    assert core.get_job("x", J1).rec.priority == 0
    _add(core, "x", ["x1"])
    _add(core, "y", ["y1"])
    assert _runs(core)[0].task == "y1"
    _refused(
        core,
        core.update_job,
        "y",
        J1,
        m.JobUpdate(priority=1001),
        status=400,
        code="InvalidPropertyValue",
    )
    _refused(
        core,
        core.update_workitem,
        "x",
        m.WorkitemUpdate(priority=-1001),
        status=400,
        code="InvalidPropertyValue",
    )
    _refused(
        core,
        core.update_workitem,
        "x",
        m.WorkitemUpdate(schedule=m.Schedule(recurrence_interval="PT1S")),
        status=400,
        code="InvalidPropertyValue",
    )


# ---------------------------------------------------------------------------- constraints


def test_job_max_wall_clock_ends_job_and_running_tasks() -> None:
    core, clock = _core()
    _wi(core, job_constraints=m.JobConstraints(max_wall_clock_time="PT1M"))
    _add(core, "wi", ["run1", "wait1"])
    spec = _runs(core)[0]
    _tick(core, clock, 61)
    job = core.get_job("wi", J1)
    assert job.rec.terminate_reason == "MaxWallClockTimeExpiry"
    sends = core.take_effects().sends
    assert any(
        isinstance(msg, pm.CancelTask) and msg.key == spec.key for _, msg in map(astuple, sends)
    )
    _, t = core.get_task("wi", J1, spec.task)
    assert t.state == "completed"
    assert t.exit_code == WALL_CLOCK_EXIT_CODE
    assert t.failure[1] == "TaskEnded"
    _, w = core.get_task("wi", J1, "wait1")
    assert w.state == "active"  # never runs
    core.tick()
    assert job.rec.state == "completed"
    assert job.rec.end_time is not None
    assert _runs(core) == []


def test_job_default_retry_count_applies_to_tasks() -> None:
    core, _ = _core()
    _wi(core, job_constraints=m.JobConstraints(max_task_retry_count=2))
    _add(core, "wi", ["t"])
    runs = 0
    while specs := _runs(core):
        runs += 1
        _complete(core, specs[0], code=3)
    _, t = core.get_task("wi", J1, "t")
    assert runs == 3
    assert t.retry_count == 2
    assert t.state == "completed"


# ---------------------------------------------------------------------------- operations


def test_terminate_then_add_tasks_is_refused() -> None:
    core, _ = _core()
    _wi(core)
    _add(core, "wi", ["a"])
    _runs(core)
    core.terminate_job("wi", J1, "enough")
    job = core.get_job("wi", J1)
    assert job.rec.state == "terminating"
    assert job.rec.terminate_reason == "enough"
    _refused(core, _add, core, "wi", ["late"], status=409, code="JobBeingTerminated")
    core.tick()
    assert job.rec.state == "completed"
    _refused(core, _add, core, "wi", ["later"], status=409, code="JobCompleted")
    _refused(core, core.terminate_job, "wi", J1, None, status=409, code="JobCompleted")
    _refused(core, core.disable_job, "wi", J1, "wait", status=409, code="JobCompleted")
    core.take_effects()
    core.add_workitem(
        m.WorkitemAdd(name="w2", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.terminate_job("w2", J1, None)
    assert core.get_job("w2", J1).rec.terminate_reason == "UserTerminate"


@pytest.mark.parametrize("option", ["requeue", "terminate", "wait"])
def test_disable_options_and_enable(option: str) -> None:
    core, _ = _core()
    _wi(core)
    _add(core, "wi", ["a", "b"])
    spec = _runs(core)[0]
    core.disable_job("wi", J1, option)
    job = core.get_job("wi", J1)
    assert job.rec.state == "disabling"
    _, a = core.get_task("wi", J1, "a")
    if option == "requeue":
        assert a.state == "active"
        assert a.requeue_count == 1
    elif option == "terminate":
        assert a.state == "completed"
        assert a.failure is not None
    else:
        assert a.state == "running"
        core.tick()
        assert job.rec.state == "disabling"  # waits for the running task
        _complete(core, spec)
    core.tick()
    assert job.rec.state == "disabled"
    _add(core, "wi", ["c"])  # accepted while disabled; waits
    assert _runs(core) == []
    core.enable_job("wi", J1)
    assert job.rec.state == "active"
    assert job.rec.prev_state == "disabled"
    assert _runs(core)
    _refused(core, core.disable_job, "wi", J1, "later", status=400, code="InvalidPropertyValue")


def test_delete_job_kills_tasks_and_removes_files() -> None:
    core, _ = _core()
    _wi(core)
    _add(core, "wi", ["a", "b"])
    spec = _runs(core)[0]
    core.delete_job("wi", J1)
    fx = core.take_effects()
    assert any(
        isinstance(msg, pm.CancelTask) and msg.key == spec.key for _, msg in map(astuple, fx.sends)
    )
    assert any(
        isinstance(msg, pm.DeleteTaskFiles) and msg.key == spec.key
        for _, msg in map(astuple, fx.sends)
    )
    assert any(w.kind == "task" and w.prefix and w.body is None for w in fx.writes)
    assert core.workitem_jobs("wi") == []
    _refused(core, core.get_job, "wi", J1, status=404, code="JobNotFound")


def test_workitem_disable_enable_terminate_delete() -> None:
    core, clock = _core()
    _wi(core, schedule=m.Schedule(recurrence_interval="PT1M"))
    core.terminate_job("wi", J1, None)
    core.disable_workitem("wi")
    _tick(core, clock, 61)
    assert _jobs(core) == [(J1, "completed")]  # disabled: no new jobs
    core.enable_workitem("wi")
    _tick(core, clock)
    assert _jobs(core) == [(J1, "completed"), ("job-0000000002", "active")]
    _add(core, "wi", ["a"], job="job-0000000002")
    _runs(core)
    core.terminate_workitem("wi")
    wi = core.get_workitem("wi")
    assert wi.state == "terminating"
    assert core.get_job("wi", "job-0000000002").rec.terminate_reason == "TerminateJobSchedule"
    _refused(core, core.disable_workitem, "wi", status=409, code="WorkItemBeingTerminated")
    core.tick()
    assert wi.state == "completed"
    _refused(core, core.terminate_workitem, "wi", status=409, code="WorkItemCompleted")
    core.delete_workitem("wi")
    assert core.jobs == {}
    assert core.workitems == {}


def test_all_tasks_complete_terminates_job() -> None:
    core, _ = _core()
    _wi(core)
    _add(core, "wi", ["a", "b"])
    core.update_job("wi", J1, m.JobUpdate(on_all_tasks_complete="terminatejob"))
    _refused(
        core,
        core.update_job,
        "wi",
        J1,
        m.JobUpdate(on_all_tasks_complete="noaction"),
        status=400,
        code="InvalidPropertyValue",
    )
    specs = _runs(core)
    _complete(core, specs[0])
    assert core.get_job("wi", J1).rec.state == "active"
    _complete(core, _runs(core)[0])
    job = core.get_job("wi", J1)
    assert job.rec.state == "terminating"
    assert job.rec.terminate_reason == "AllTasksComplete"


# ---------------------------------------------------------------------------- job managers


def _jm(**kw: object) -> m.JobManager:
    return m.JobManager(name="jm", command_line="python manager.py", **kw)  # type: ignore[arg-type]


def test_job_manager_runs_first_exclusively_with_scoped_credential() -> None:
    core, _ = _core(n_agents=2, slots=2)
    _wi(core, job_manager=_jm(kill_job_on_completion=False, run_elevated=True))
    job = core.get_job("wi", J1)
    assert job.tasks["jm"].job_manager
    _add(core, "wi", ["t1", "t2", "t3"])
    specs = _runs(core)
    jm = next(s for s in specs if s.task == "jm")
    assert jm.job_manager
    assert jm.run_elevated
    assert jm.env["TVM_JOB_TOKEN"] == job.rec.token
    assert jm.env["TVM_ENDPOINT"] == "http://coord:1"
    assert jm.env["TVM_ACCOUNT"] == "acct"
    assert core.job_for_token(job.rec.token) is job
    assert core.job_for_token(job.rec.token + "x") is None
    assert core.job_for_token("wi.job-0000000002.abc") is None
    _, jm_task = core.get_task("wi", J1, "jm")
    others = [s for s in specs if s.task != "jm"]
    # runExclusive: the JM's TVM (2 slots) runs nothing else; the other TVM takes two tasks.
    assert len(others) == 2
    assert all(core.get_task("wi", J1, s.task)[1].tvm != jm_task.tvm for s in others)
    assert "TVM_JOB_TOKEN" not in others[0].env


def test_job_manager_waits_before_other_tasks_of_its_job() -> None:
    core, _ = _core(n_agents=1, slots=1)
    _wi(core, "busy")
    _add(core, "busy", ["blocker"])
    blocker = _runs(core)[0]
    _wi(core, job_manager=_jm())
    _add(core, "wi", ["t1"])
    assert _runs(core) == []
    _complete(core, blocker)
    specs = _runs(core)
    assert [s.task for s in specs] == ["jm"]  # not t1


def test_job_manager_completion_completes_job() -> None:
    core, _ = _core(n_agents=2)
    _wi(core, job_manager=_jm())
    _add(core, "wi", ["t1"])
    specs = {s.task: s for s in _runs(core)}
    _complete(core, specs["jm"])
    job = core.get_job("wi", J1)
    assert job.rec.state == "terminating"
    assert job.rec.terminate_reason == "JMComplete"
    _, t1 = core.get_task("wi", J1, "t1")
    assert t1.state == "completed"  # killed with the job
    core.tick()
    assert job.rec.state == "completed"


def test_job_manager_restarts_first_after_tvm_loss_evicting_lower_or_equal_priority() -> None:
    core, clock = _core(n_agents=2, slots=1)
    _wi(core, "hi", priority=100)
    _wi(core, job_manager=_jm(), priority=0)
    _add(core, "wi", ["t1", "t2"])
    specs = {s.task: s for s in _runs(core)}
    assert set(specs) == {"jm", "t1"}
    jm_agent = core.tvms[core.get_task("wi", J1, "jm")[1].tvm].rec.agent_id  # type: ignore[index]
    other = next(a for a in core.agents if a != jm_agent)
    core.agent_disconnected(jm_agent)
    clock.now += 11
    core.agent_message(other, pm.Heartbeat())
    core.tick()
    specs2 = _runs(core)
    assert [s.task for s in specs2] == ["jm"]
    _, jm = core.get_task("wi", J1, "jm")
    _, t1 = core.get_task("wi", J1, "t1")
    assert jm.state == "running"
    assert jm.requeue_count == 1
    assert core.tvms[jm.tvm].rec.agent_id == other
    assert t1.state == "active"
    assert t1.requeue_count == 1
    # A higher-priority job's task is never displaced.
    core2, clock2 = _core(n_agents=2, slots=1)
    _wi(core2, job_manager=_jm(), priority=0)
    (first,) = _runs(core2)
    _wi(core2, "hi", priority=100)
    _add(core2, "hi", ["h1"])
    (h1,) = _runs(core2)
    jm_agent = core2.tvms[core2.get_task("wi", J1, "jm")[1].tvm].rec.agent_id  # type: ignore[index]
    other = next(a for a in core2.agents if a != jm_agent)
    core2.agent_disconnected(jm_agent)
    clock2.now += 11
    core2.agent_message(other, pm.Heartbeat())
    core2.tick()
    assert _runs(core2) == []
    assert core2.get_task("hi", J1, "h1")[1].state == "running"


def test_failed_job_manager_retries_at_highest_priority() -> None:
    core, _ = _core(n_agents=1, slots=1)
    _wi(core, job_manager=_jm(task_constraints=m.TaskConstraints(max_task_retry_count=1)))
    _wi(core, "other", priority=1000)
    _add(core, "other", ["o1"])
    (jm,) = _runs(core)
    assert jm.task == "jm"
    _complete(core, jm, code=1)
    (again,) = _runs(core)
    assert again.task == "jm"  # retried before the priority-1000 job's waiting task
    assert core.get_job("wi", J1).rec.state == "active"


def test_schedule_jobs_and_credentials_survive_a_restart() -> None:
    core, clock = _core()
    rows: dict[tuple[str, str], bytes] = {}

    def journal() -> None:
        for w in core.take_effects().writes:
            if w.prefix:
                for k in [k for k in rows if k[0] == w.kind and k[1].startswith(w.key)]:
                    del rows[k]
            elif w.body is None:
                rows.pop((w.kind, w.key), None)
            else:
                rows[(w.kind, w.key)] = w.body

    core.take_effects()
    _wi(core, schedule=m.Schedule(recurrence_interval="PT5M"), job_manager=_jm(), priority=7)
    core.disable_job("wi", J1, "wait")
    journal()
    restored = CoordinatorState("acct", clock=clock)
    restored.restore((k, key, body) for (k, key), body in rows.items())
    job = restored.get_job("wi", J1)
    assert job.rec.state == "disabling"
    assert job.rec.priority == 7
    assert job.rec.jm_name == "jm"
    assert restored.job_for_token(core.get_job("wi", J1).rec.token) is job
    assert restored.get_workitem("wi").next_run == pytest.approx(clock.now + 300)
    assert restored.get_task("wi", J1, "jm")[1].job_manager


def test_exclusive_job_manager_is_not_starved_on_a_busy_multi_slot_tvm() -> None:
    core, _ = _core(n_agents=1, slots=2)
    _wi(core, "busy")
    _add(core, "busy", [f"b{i}" for i in range(6)])
    first = _runs(core)
    assert len(first) == 2
    _wi(core, job_manager=_jm())
    _complete(core, first[0])
    assert _runs(core) == []  # the freed slot is kept: the TVM drains for the exclusive manager
    _complete(core, first[1])
    assert [s.task for s in _runs(core)] == ["jm"]
    assert _runs(core) == []  # nothing else beside it
