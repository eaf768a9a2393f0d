"""Render in-memory records as REST resources (pure)."""

from __future__ import annotations

from typing import cast

from coordinator.common import models as m
from coordinator.common.timeutil import UNLIMITED, format_duration, rfc3339
from coordinator.core import CoordinatorState
from coordinator.core.deps import status as dependency_status
from coordinator.core.multi import Sub
from coordinator.core.records import ACTIVE, COMPLETED, Job, PoolRec, TaskRec, Tvm, WorkitemRec


def _t(ts: float | None) -> str:
    return rfc3339(ts) or ""


def pool_view(core: CoordinatorState, pool: PoolRec) -> m.Pool:
    s = pool.spec
    # TVMs on their way out (leavingpool) no longer count (issue 5).
    current = sum(
        1
        for t in core.tvms.values()
        if t.rec.pool == s.name and t.rec.pending_op not in ("leave", "leaving")
    )
    return m.Pool(
        name=s.name,
        state=pool.state,
        allocation_state=pool.alloc_state,
        vm_size=s.vm_size,
        target_dedicated=pool.target,
        current_dedicated=current,
        max_tasks_per_vm=s.max_tasks_per_vm,
        tvm_fill_type=s.tvm_fill_type,
        creation_time=_t(pool.created),
        state_transition_time=_t(pool.state_time),
        allocation_state_transition_time=_t(pool.alloc_time),
        resize_timeout=format_duration(pool.resize_timeout_s),
        start_task=s.start_task,
        communication=s.communication,
        certificate_references=s.certificate_references,
        bubblewrap=s.bubblewrap,
        task_pids_limit=s.task_pids_limit,
        tvm_disk_limit_mib=s.tvm_disk_limit_mib,
        unknown_tvm_timeout=s.unknown_tvm_timeout,
        enable_auto_scale=s.enable_auto_scale,
        auto_scale_formula=s.auto_scale_formula,
        auto_scale_evaluation_interval=s.auto_scale_evaluation_interval,
        resize_error=m.ResizeError(code=pool.resize_error[0], message=pool.resize_error[1])
        if pool.resize_error
        else None,
        metadata=s.metadata,
        auto_scale_run=autoscale_run_view(pool.auto_scale_run),
    )


def autoscale_run_view(
    run: tuple[float, str, str | None, str | None] | None,
) -> m.AutoScaleRun | None:
    """(timestamp, results, error code, error message) -> `{timestamp, results, error?}`."""
    if run is None:
        return None
    ts, results, code, message = run
    error = m.AutoScaleRunError(code=code, message=message or "") if code else None
    return m.AutoScaleRun(timestamp=_t(ts), results=results, error=error)


def tvm_view(core: CoordinatorState, tvm: Tvm) -> m.Tvm:
    r = tvm.rec
    agent = core.agents.get(r.agent_id)
    st = None
    if r.start_task:
        d = r.start_task
        failure = cast("tuple[str, str, str] | None", d.get("failure"))
        st = m.StartTaskInfo(
            state=str(d.get("state", "running")),
            start_time=rfc3339(cast("float | None", d.get("start_time"))),
            end_time=rfc3339(cast("float | None", d.get("end_time"))),
            exit_code=cast("int | None", d.get("exit_code")),
            retry_count=int(cast(int, d.get("retry_count", 0) or 0)),
            scheduling_error=scheduling_error(failure),
        )
    recent = []
    for key, task in list(tvm.running.items())[:20]:
        wi, job, _ = key.split("/")
        name = task.name  # a multi-instance task's instance is listed as its task
        recent.append(
            m.TaskInformation(workitem_name=wi, job_name=job, task_name=name, task_state=task.state)
        )
    pool = core.pools.get(r.pool)
    return m.Tvm(
        name=r.name,
        state=r.state,
        pool_name=r.pool,
        ip_address=r.ip,
        vm_size=pool.spec.vm_size if pool else "",
        state_transition_time=_t(r.state_time),
        allocation_time=_t(r.created),
        scheduling_state=r.scheduling,
        running_tasks_count=len(tvm.running),
        running_task_slots_count=tvm.slots - max(tvm.free, 0),  # queued tasks take none
        total_tasks_run=r.total_run,
        start_task_info=st,
        recent_tasks=recent,
        agent_id=r.agent_id,
        hostname=agent.hostname if agent else "",
        cores=agent.cores if agent else 0,
        memory_bytes=agent.memory_bytes if agent else 0,
        last_heartbeat_time=rfc3339(tvm.last_heartbeat),
        cert_errors=r.cert_errors,
        port_range_low=r.port_low,
        port_range_high=r.port_high,
        degraded_modes=core.tvm_degraded(tvm),
        state_reason=r.state_reason if r.state in ("unknown", "unusable") else "",
    )


def workitem_view(wi: WorkitemRec) -> m.Workitem:
    s = wi.spec
    return m.Workitem(
        name=s.name,
        state=wi.state,
        creation_time=_t(wi.created),
        state_transition_time=_t(wi.state_time),
        job_execution_environment=s.job_execution_environment,
        priority=s.priority,
        job_constraints=s.job_constraints,
        job_manager=s.job_manager,
        schedule=s.schedule,
        common_environment_settings=s.common_environment_settings,
        execution_info=m.WorkitemExecutionInfo(
            recent_job=wi.recent_job,
            next_run_time=rfc3339(wi.next_run),
            end_time=rfc3339(wi.end_time),
        ),
        metadata=s.metadata,
        on_all_tasks_complete=s.on_all_tasks_complete,
        job_preparation_task=s.job_preparation_task,
        job_release_task=s.job_release_task,
        uses_task_dependencies=s.uses_task_dependencies,
        on_task_failure=s.on_task_failure,
        max_parallel_tasks=s.max_parallel_tasks,
    )


def job_view(core: CoordinatorState, job: Job, counts: bool = True) -> m.Job:
    r = job.rec
    return m.Job(
        name=r.name,
        workitem_name=r.workitem,
        state=r.state,
        priority=r.priority,
        creation_time=_t(r.created),
        state_transition_time=_t(r.state_time),
        execution_info=m.JobExecutionInfo(
            start_time=_t(r.created),
            pool_name=r.pool,
            end_time=rfc3339(r.end_time),
            terminate_reason=r.terminate_reason,
        ),
        task_counts=core.task_counts(job) if counts else None,
        previous_state=r.prev_state,
        on_all_tasks_complete=r.on_all_complete,
        job_constraints=m.JobConstraints(
            max_wall_clock_time=format_duration(r.max_wall_s)
            if r.max_wall_s is not None
            else UNLIMITED,
            max_task_retry_count=r.max_retries,
        ),
        job_manager_task_name=r.jm_name,
        max_parallel_tasks=r.max_parallel,
    )


def scheduling_error(failure: tuple[str, str, str] | None) -> m.SchedulingError | None:
    """A record's failure (category, code, message) as the wire's schedulingError."""
    if not failure:
        return None
    return m.SchedulingError(category=failure[0], code=failure[1], message=failure[2])


def _subtasks(subs: list[Sub] | None) -> list[m.SubtaskInfo]:
    return [
        m.SubtaskInfo(
            id=i,
            state=s.state,
            tvm_name=s.tvm,
            exit_code=s.exit_code,
            start_time=rfc3339(s.start_time),
            end_time=rfc3339(s.end_time),
            scheduling_error=scheduling_error(s.failure),
        )
        for i, s in enumerate(subs or ())
    ]


def task_view(job: Job, t: TaskRec, subs: list[Sub] | None = None) -> m.Task:
    info = m.TaskExecutionInfo(
        start_time=rfc3339(t.start_time)
        if t.state != ACTIVE or t.retry_count or t.requeue_count
        else None,
        end_time=rfc3339(t.end_time) if t.state == COMPLETED else None,
        exit_code=t.exit_code if t.state == COMPLETED or t.retry_count else None,
        retry_count=t.retry_count,
        requeue_count=t.requeue_count,
        last_retry_time=rfc3339(t.last_retry),
        last_requeue_time=rfc3339(t.last_requeue),
        scheduling_error=scheduling_error(t.failure),
    )
    wall = t.max_wall_s if t.max_wall_s is not None else job.rec.max_wall_s
    retries = t.max_retries if t.max_retries is not None else job.rec.max_retries
    constraints = m.TaskConstraints(
        max_wall_clock_time=format_duration(wall) if wall is not None else UNLIMITED,
        max_task_retry_count=retries,
        retention_time=format_duration(t.retention_s) if t.retention_s is not None else "P7D",
    )
    dep = dependency_status(job, t) if job.deps is not None else None
    return m.Task(
        name=t.name,
        state=t.state,
        command_line=t.command_line,
        creation_time=_t(t.created),
        state_transition_time=_t(t.state_time),
        environment_settings=[
            m.EnvironmentSetting(name=k, value=v) for k, v in (t.env or {}).items()
        ],
        resource_files=t.resource_files or [],
        task_constraints=constraints,
        run_elevated=t.run_elevated,
        previous_state=t.prev_state,
        execution_info=info,
        tvm_info=m.TvmInfo(pool_name=t.pool or "", tvm_name=t.tvm) if t.tvm else None,
        depends_on=t.depends_on,
        exit_conditions=t.exit_conditions,
        dependency_state=dep[0] if dep else None,
        dependency_reason=dep[1] if dep else None,
        output_files=t.output_files or [],
        required_slots=t.slots,
        output_file_results=[
            m.OutputFileResult(path=p, sha256=h, size=n) for p, h, n in t.uploaded or ()
        ],
        multi_instance_settings=t.multi,
        affinity_id=t.affinity,
        subtasks=_subtasks(subs),
    )
