"""Issue 4, pure core: retries, wall clock, requeue on TVM loss, exactly-once completion, bad input.

No I/O: the core is driven with agent events and a fake clock; effects are inspected directly.
"""

from __future__ import annotations

import msgspec
import pytest
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import WALL_CLOCK_EXIT_CODE, CoordinatorState, Send
from protocol import messages as pm


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _core(
    n_agents: int = 2,
    job_retries: int | None = None,
    common_env: dict[str, str] | None = None,
) -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0)
    for i in range(n_agents):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=n_agents))
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    jc = m.JobConstraints(max_task_retry_count=job_retries) if job_retries is not None else None
    core.add_workitem(
        m.WorkitemAdd(
            name="wi",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            job_constraints=jc,
            common_environment_settings=[
                m.EnvironmentSetting(name=k, value=v) for k, v in (common_env or {}).items()
            ],
        )
    )
    core.take_effects()
    return core, clock


JOB = "job-0000000001"


def _add(core: CoordinatorState, name: str = "t", **kw: object) -> None:
    constraints = kw.pop("constraints", None)
    core.add_task(
        "wi", JOB, m.TaskAdd(name=name, command_line="run", task_constraints=constraints, **kw)
    )


def _run(core: CoordinatorState) -> list[pm.RunTask]:
    core.schedule()
    return [
        msg for _, msg in map(astuple, core.take_effects().sends) if isinstance(msg, pm.RunTask)
    ]


def _agent_of(core: CoordinatorState, task: str) -> str:
    _, t = core.get_task("wi", JOB, task)
    return core.tvms[t.tvm].rec.agent_id


def _lose(core: CoordinatorState, clock: Clock, agent: str) -> None:
    """`agent` drops its link; the others keep heartbeating; the heartbeat timeout passes."""
    core.agent_disconnected(agent)
    clock.now += 11
    for a in core.agents.values():
        if a.agent_id != agent:
            core.agent_message(a.agent_id, pm.Heartbeat())
    core.tick()


def _complete(
    core: CoordinatorState,
    spec: pm.TaskSpec,
    code: int,
    failure: pm.Failure | None = None,
    agent: str | None = None,
) -> None:
    agent = agent or _agent_of(core, spec.task)
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key,
            attempt=spec.attempt,
            exit_code=code,
            start_time=core.clock(),
            end_time=core.clock(),
            failure=failure,
        ),
    )


# ---------------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    ("task_retries", "job_retries", "runs"),
    [
        (2, None, 3),  # task value: N+1 runs
        (None, 1, 2),  # job default when the task says nothing
        (0, 5, 1),  # the task value wins over the job default: 0 = no retry
        (None, None, 1),  # default: no retry
    ],
)
def test_failing_task_runs_max_retries_plus_one_times(task_retries, job_retries, runs):
    core, clock = _core(job_retries=job_retries)
    c = m.TaskConstraints(max_task_retry_count=task_retries) if task_retries is not None else None
    _add(core, constraints=c)
    seen = 0
    while True:
        specs = _run(core)
        if not specs:
            break
        seen += 1
        clock.now += 5
        _complete(core, specs[0].spec, 3)
    _, t = core.get_task("wi", JOB, "t")
    assert seen == runs
    assert t.state == "completed"
    assert t.exit_code == 3
    assert t.retry_count == runs - 1
    assert t.requeue_count == 0
    assert (t.last_retry is not None) == (runs > 1)
    if runs > 1:
        assert t.last_retry == clock.now - 5  # set at the last failing completion that retried


def test_unlimited_retries_until_success():
    core, clock = _core()
    _add(core, constraints=m.TaskConstraints(max_task_retry_count=-1))
    for _ in range(25):
        (run,) = _run(core)
        _complete(core, run.spec, 1)
    (run,) = _run(core)
    _complete(core, run.spec, 0)
    _, t = core.get_task("wi", JOB, "t")
    assert t.state == "completed"
    assert t.exit_code == 0
    assert t.retry_count == 25
    assert core.task_counts(core.get_job("wi", JOB)).succeeded == 1


def test_wall_clock_and_download_failures_are_not_retried():
    core, _ = _core()
    _add(
        core,
        "wall",
        constraints=m.TaskConstraints(max_task_retry_count=5, max_wall_clock_time="PT2S"),
    )
    _add(core, "dl", constraints=m.TaskConstraints(max_task_retry_count=5))
    runs = {r.spec.task: r.spec for r in _run(core)}
    assert runs["wall"].max_wall_clock_s == 2.0
    _complete(
        core,
        runs["wall"],
        WALL_CLOCK_EXIT_CODE,
        pm.Failure(category="ServerError", code="TaskEnded"),
    )
    _complete(
        core,
        runs["dl"],
        -1,
        pm.Failure(category="UserError", code="ResourceNotFound", message="404"),
    )
    assert _run(core) == []
    _, wall = core.get_task("wi", JOB, "wall")
    _, dl = core.get_task("wi", JOB, "dl")
    assert (wall.state, wall.exit_code, wall.retry_count, wall.failure[:2]) == (
        "completed",
        0xC000013A,
        0,
        ("ServerError", "TaskEnded"),
    )
    assert (dl.state, dl.retry_count, dl.failure[:2]) == (
        "completed",
        0,
        ("UserError", "ResourceNotFound"),
    )
    counts = core.task_counts(core.get_job("wi", JOB))
    assert (counts.completed, counts.failed, counts.succeeded) == (2, 2, 0)


def test_job_wall_clock_default_reaches_the_agent():
    core, _ = _core()
    core.add_workitem(
        m.WorkitemAdd(
            name="w2",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            job_constraints=m.JobConstraints(max_wall_clock_time="PT1M"),
        )
    )
    core.add_task("w2", JOB, m.TaskAdd(name="x", command_line="run"))
    (run,) = _run(core)
    assert run.spec.max_wall_clock_s == 60.0


def test_update_constraints_after_add_changes_the_next_run():
    core, _ = _core()
    _add(core)
    core.update_task(
        "wi",
        JOB,
        "t",
        m.TaskUpdate(
            task_constraints=m.TaskConstraints(
                max_task_retry_count=1, max_wall_clock_time="PT30S", retention_time="PT1H"
            )
        ),
    )
    (run,) = _run(core)
    assert run.spec.max_wall_clock_s == 30.0
    assert run.spec.retention_s == 3600.0
    _complete(core, run.spec, 1)
    (run,) = _run(core)  # retried once thanks to the update
    _complete(core, run.spec, 1)
    assert _run(core) == []
    _, t = core.get_task("wi", JOB, "t")
    assert t.retry_count == 1
    assert t.state == "completed"


# ---------------------------------------------------------------------------- bad input


def _snapshot(core: CoordinatorState) -> bytes:
    job = core.get_job("wi", JOB)
    return (
        msgspec.msgpack.encode({k: t for k, t in job.tasks.items()}) + repr(len(job.queue)).encode()
    )


@pytest.mark.parametrize(
    ("constraints", "code", "field"),
    [
        (
            m.TaskConstraints(max_task_retry_count=-2),
            "InvalidPropertyValue",
            "taskConstraints.maxTaskRetryCount",
        ),
        (
            m.TaskConstraints(max_wall_clock_time="-PT5S"),
            "InvalidPropertyValue",
            "taskConstraints.maxWallClockTime",
        ),
        (
            m.TaskConstraints(max_wall_clock_time="5 seconds"),
            "InvalidPropertyValue",
            "taskConstraints.maxWallClockTime",
        ),
        (
            m.TaskConstraints(max_wall_clock_time="PT"),
            "InvalidPropertyValue",
            "taskConstraints.maxWallClockTime",
        ),
        (
            m.TaskConstraints(retention_time="P-1D"),
            "InvalidPropertyValue",
            "taskConstraints.retentionTime",
        ),
        (
            m.TaskConstraints(retention_time="-P1D"),
            "InvalidPropertyValue",
            "taskConstraints.retentionTime",
        ),
    ],
)
def test_bad_constraints_are_refused_on_add_and_update(constraints, code, field):
    core, _ = _core()
    _add(core, "keep", constraints=m.TaskConstraints(max_task_retry_count=3, retention_time="PT1H"))
    core.take_effects()
    before = _snapshot(core)
    with pytest.raises(ApiError) as e:
        _add(core, "bad", constraints=constraints)
    assert (e.value.status, e.value.code) == (400, code)
    assert field in e.value.message
    with pytest.raises(ApiError) as e:
        core.update_task("wi", JOB, "keep", m.TaskUpdate(task_constraints=constraints))
    assert (e.value.status, e.value.code) == (400, code)
    assert _snapshot(core) == before
    assert core.take_effects().writes == []


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "", "a/./../../b"])
def test_escaping_resource_file_paths_are_refused(path):
    core, _ = _core()
    before = _snapshot(core)
    with pytest.raises(ApiError) as e:
        _add(core, resource_files=[m.ResourceFile(blob_source="http://h/x", file_path=path)])
    assert (e.value.status, e.value.code) == (400, "InvalidResourceFilePath")
    assert "resourceFiles[0].filePath" in e.value.message
    assert _snapshot(core) == before
    assert core.take_effects().writes == []


@pytest.mark.parametrize(
    "source", ["ftp://h/x", "file:///etc/passwd", "filestore:sha256:xyz", "h/x"]
)
def test_bad_resource_file_sources_are_refused(source):
    core, _ = _core()
    with pytest.raises(ApiError) as e:
        _add(core, resource_files=[m.ResourceFile(blob_source=source, file_path="x")])
    assert e.value.status == 400
    assert e.value.code in ("InvalidResourceFileSource", "InvalidPropertyValue")
    assert core.get_job("wi", JOB).tasks == {}


@pytest.mark.parametrize(
    "name", ["WATASK_TASK_NAME", "watask_job_name", "AZ_BATCH_TASK_ID", "WATASK_ANYTHING"]
)
def test_system_variables_cannot_be_overridden(name):
    core, _ = _core()
    with pytest.raises(ApiError) as e:
        _add(core, environment_settings=[m.EnvironmentSetting(name=name, value="x")])
    assert (e.value.status, e.value.code) == (400, "ReservedEnvironmentVariable")
    with pytest.raises(ApiError) as e:
        core.add_workitem(
            m.WorkitemAdd(
                name="w3",
                job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
                common_environment_settings=[m.EnvironmentSetting(name=name, value="x")],
            )
        )
    assert (e.value.status, e.value.code) == (400, "ReservedEnvironmentVariable")
    assert "w3" not in core.workitems


def test_task_env_overrides_workitem_common_env():
    core, _ = _core(common_env={"A": "common", "B": "common"})
    _add(core, environment_settings=[m.EnvironmentSetting(name="B", value="task")])
    (run,) = _run(core)
    assert run.spec.env == {"A": "common", "B": "task"}


# ---------------------------------------------------------------------------- terminate / delete / counts


def test_terminate_running_task_cancels_it_and_late_result_is_ignored():
    core, _ = _core()
    _add(core, constraints=m.TaskConstraints(max_task_retry_count=3))
    (run,) = _run(core)
    agent = _agent_of(core, "t")
    core.terminate_task("wi", JOB, "t")
    sends = core.take_effects().sends
    assert (
        Send(agent, pm.CancelTask(key=run.spec.key, attempt=run.spec.attempt, reason="terminated"))
        in sends
    )
    _complete(core, run.spec, 137, agent=agent)  # the killed process reports: not a retry
    _, t = core.get_task("wi", JOB, "t")
    assert t.state == "completed"
    assert t.retry_count == 0
    assert t.failure[1] == "TaskEnded"
    assert _run(core) == []
    assert core.task_counts(core.get_job("wi", JOB)).failed == 1


def test_delete_task_tells_the_tvm_to_remove_files():
    core, _ = _core()
    _add(core)
    (run,) = _run(core)
    agent = _agent_of(core, "t")
    _complete(core, run.spec, 0)
    core.take_effects()
    core.delete_task("wi", JOB, "t")
    fx = core.take_effects()
    assert Send(agent, pm.DeleteTaskFiles(key=run.spec.key)) in fx.sends
    assert any(w.kind == "task" and w.body is None for w in fx.writes)
    with pytest.raises(ApiError) as e:
        core.get_task("wi", JOB, "t")
    assert e.value.status == 404


def test_task_counts():
    core, _ = _core(n_agents=1)
    for i in range(4):
        _add(core, f"t{i}")
    (r0,) = _run(core)
    _complete(core, r0.spec, 0)
    (r1,) = _run(core)
    _complete(core, r1.spec, 2)
    _run(core)  # third one running now
    c = core.task_counts(core.get_job("wi", JOB))
    assert (c.active, c.running, c.completed, c.succeeded, c.failed) == (1, 1, 2, 1, 1)


# ---------------------------------------------------------------------------- requeue on TVM loss


def test_lost_tvm_requeues_running_task_and_late_result_is_recorded_once():
    core, clock = _core(n_agents=2)
    _add(core, constraints=m.TaskConstraints(max_task_retry_count=0))
    (first,) = _run(core)
    old_agent = _agent_of(core, "t")
    old_tvm = core.get_task("wi", JOB, "t")[1].tvm
    _lose(core, clock, old_agent)
    assert core.tvms[old_tvm].rec.state == "unknown"
    _, t = core.get_task("wi", JOB, "t")
    assert (t.state, t.requeue_count, t.retry_count) == ("active", 1, 0)
    assert t.last_requeue == clock.now
    (second,) = _run(core)
    assert second.spec.attempt != first.spec.attempt
    new_agent = _agent_of(core, "t")
    assert new_agent != old_agent
    # The old agent returns still running the old attempt: it is told to cancel it...
    core.agent_hello(
        pm.Hello(
            agent_id=old_agent,
            token="t",
            running=[pm.RunningTask(key=first.spec.key, attempt=first.spec.attempt)],
        )
    )
    sends = core.take_effects().sends
    assert (
        Send(
            old_agent,
            pm.CancelTask(key=first.spec.key, attempt=first.spec.attempt, reason="not assigned"),
        )
        in sends
    )
    # ...and its late (failing) result changes nothing.
    _complete(core, first.spec, 9, agent=old_agent)
    _, t = core.get_task("wi", JOB, "t")
    assert t.state == "running"
    assert t.exit_code is None
    _complete(core, second.spec, 0, agent=new_agent)
    _complete(core, second.spec, 0, agent=new_agent)  # a resend after reconnect
    _complete(core, first.spec, 9, agent=old_agent)
    _, t = core.get_task("wi", JOB, "t")
    assert (t.state, t.exit_code, t.retry_count, t.requeue_count) == ("completed", 0, 0, 1)
    assert core.tvms[old_tvm].rec.state == "idle"
    assert core.tvms[core.get_task("wi", JOB, "t")[1].tvm].rec.total_run == 1


def test_late_result_of_requeued_task_not_yet_placed_is_ignored():
    core, clock = _core(n_agents=1)
    _add(core)
    (first,) = _run(core)
    agent = _agent_of(core, "t")
    _lose(core, clock, agent)
    _complete(core, first.spec, 0, agent=agent)
    _, t = core.get_task("wi", JOB, "t")
    assert (t.state, t.requeue_count) == ("active", 1)


def test_silent_link_past_heartbeat_timeout_is_closed_and_requeues():
    core, clock = _core(n_agents=2)
    _add(core)
    _run(core)
    agent = _agent_of(core, "t")
    clock.now += 10.5
    for a in core.agents.values():
        if a.agent_id != agent:
            core.agent_message(a.agent_id, pm.Heartbeat())
    core.tick()  # silent past the timeout: the link is closed
    fx = core.take_effects()
    assert [c.agent_id for c in fx.closes] == [agent]
    clock.now += 0.2
    core.tick()  # and at the next tick, without a reconnect, the TVM is lost
    assert core.tvms[core.agents[agent].tvm].rec.state == "unknown"
    _, t = core.get_task("wi", JOB, "t")
    assert (t.state, t.requeue_count) == ("active", 1)


def test_terminate_active_task_completes_it_without_running():
    core, _ = _core(n_agents=1)
    _add(core)
    core.terminate_task("wi", JOB, "t")
    assert _run(core) == []  # a free TVM, but the task never runs
    _, t = core.get_task("wi", JOB, "t")
    assert t.state == "completed"
    assert t.failure[:2] == ("UserError", "TaskEnded")
    c = core.task_counts(core.get_job("wi", JOB))
    assert (c.active, c.completed, c.failed) == (0, 1, 1)


def test_a_job_holds_at_most_max_tasks_per_job() -> None:
    """Single adds and collections stop at the limit (a collection's tasks over it refused alone,
    nothing else changed); a deleted task makes room again."""
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, max_tasks_per_job=3)
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    _add(core, "a")
    res = core.add_tasks(
        "wi", JOB, [m.TaskAdd(name=n, command_line="run") for n in ("b", "c", "d", "e")]
    )
    assert [r.status for r in res] == ["success", "success", "clienterror", "clienterror"]
    assert res[2].error is not None
    assert res[2].error["code"] == "JobTaskQuotaReached"
    with pytest.raises(ApiError) as exc:
        _add(core, "f")
    assert (exc.value.status, exc.value.code) == (409, "JobTaskQuotaReached")
    assert "max-tasks-per-job" in exc.value.message
    assert sorted(core.get_job("wi", JOB).tasks) == ["a", "b", "c"]
    core.delete_task("wi", JOB, "a")
    _add(core, "f")
    assert sorted(core.get_job("wi", JOB).tasks) == ["b", "c", "f"]


def test_all_jobs_together_hold_at_most_max_tasks() -> None:
    """max-tasks bounds the tasks of every job together (many jobs cannot do what one may not):
    single adds and collections stop at it (a collection's tasks over it refused alone, nothing
    else changed); deleting a task, a job or a workitem makes room again."""
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, max_tasks=4)
    for wi in ("wi", "w2"):
        core.add_workitem(
            m.WorkitemAdd(
                name=wi, job_execution_environment=m.JobExecutionEnvironment(pool_name="p")
            )
        )
    _add(core, "a")
    core.add_tasks("w2", JOB, [m.TaskAdd(name=n, command_line="run") for n in ("x", "y")])
    res = core.add_tasks(
        "wi", JOB, [m.TaskAdd(name=n, command_line="run") for n in ("b", "c", "d")]
    )
    assert [r.status for r in res] == ["success", "clienterror", "clienterror"]
    assert res[1].error is not None
    assert res[1].error["code"] == "TaskQuotaReached"
    for wi, name in (("wi", "e"), ("w2", "z")):
        with pytest.raises(ApiError) as exc:
            core.add_task(wi, JOB, m.TaskAdd(name=name, command_line="run"))
        assert (exc.value.status, exc.value.code) == (409, "TaskQuotaReached")
        assert "max-tasks" in exc.value.message
    assert sorted(core.get_job("wi", JOB).tasks) == ["a", "b"]
    assert sorted(core.get_job("w2", JOB).tasks) == ["x", "y"]
    core.delete_task("wi", JOB, "a")
    _add(core, "e")
    with pytest.raises(ApiError):
        _add(core, "f")
    core.delete_job("w2", JOB)  # its two tasks go with it
    core.add_tasks("wi", JOB, [m.TaskAdd(name=n, command_line="run") for n in ("f", "g")])
    with pytest.raises(ApiError):
        _add(core, "h")
    core.delete_workitem("wi")
    assert core.store.task_count == 0


# ---------------------------------------------------------------------------- a broken agent's times


def test_times_that_are_not_finite_numbers_are_taken_as_the_arrival():
    """A broken agent's NaN or infinite start and end times: the core keeps the moment the message
    arrived, so both APIs' views of the task (times, durations) still render."""
    from coordinator.rest import views
    from coordinator.rest.azure import views as azure_views

    core, clock = _core(n_agents=1)
    _add(core, "t")
    (run,) = _run(core)
    agent = _agent_of(core, "t")
    clock.now += 5
    nan, inf = float("nan"), float("inf")
    core.agent_message(
        agent, pm.TaskStarted(key=run.spec.key, attempt=run.spec.attempt, start_time=nan)
    )
    clock.now += 5
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=run.spec.key, attempt=run.spec.attempt, exit_code=0, start_time=-inf, end_time=inf
        ),
    )
    job, task = core.get_task("wi", JOB, "t")
    assert task.state == "completed"
    assert (task.start_time, task.end_time) == (clock.now, clock.now)
    shown = views.task_view(job, task)
    assert shown.execution_info is not None
    assert shown.execution_info.end_time is not None
    assert azure_views.task_view(core, "http://x", job, task)["executionInfo"]["endTime"]
