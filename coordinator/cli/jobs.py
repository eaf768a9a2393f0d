"""`tvm workitem|job ...`: thin commands over the Python client."""

from __future__ import annotations

from typing import Any

import click

from ._common import CONTEXT, _emit, _mk, _run, credentials, output_option

WI_COLS = [
    ("name", lambda w: w.name),
    ("state", lambda w: w.state),
    ("pool", lambda w: w.job_execution_environment.pool_name),
    ("priority", lambda w: w.priority),
    ("recent job", lambda w: w.execution_info.recent_job if w.execution_info else ""),
]

JOB_COLS = [
    ("name", lambda j: j.name),
    ("state", lambda j: j.state),
    ("priority", lambda j: j.priority),
    ("pool", lambda j: j.execution_info.pool_name),
    ("active", lambda j: j.task_counts.active if j.task_counts else ""),
    ("running", lambda j: j.task_counts.running if j.task_counts else ""),
    ("succeeded", lambda j: j.task_counts.succeeded if j.task_counts else ""),
    ("failed", lambda j: j.task_counts.failed if j.task_counts else ""),
]


# --------------------------------------------------------------------------- workitems and jobs


@click.group(context_settings=CONTEXT)
def workitem() -> None:
    """Workitems (each creates jobs)."""


@workitem.command("add")
@click.argument("name")
@click.option("--pool", "pool_name", required=True, help="Pool the jobs run on.")
@click.option("--priority", default=0, show_default=True, help="-1000..1000")
@click.option(
    "--max-task-retries", type=int, default=None, help="Default maxTaskRetryCount of its tasks."
)
@click.option("--max-wall-clock", default=None, help="Job maxWallClockTime (ISO 8601, e.g. PT1H).")
@click.option(
    "--recurrence", default=None, help="Schedule recurrenceInterval (ISO 8601, at least PT1M)."
)
@click.option("--do-not-run-until", default=None, help="Schedule start (RFC 3339 UTC).")
@click.option("--do-not-run-after", default=None, help="Schedule end (RFC 3339 UTC).")
@click.option(
    "--start-window", default=None, help="Schedule startWindow (ISO 8601, at least PT1M)."
)
@click.option(
    "--job-manager",
    "jm_command",
    default=None,
    help="Job manager command line (runs with each job).",
)
@click.option("--job-manager-name", "jm_name", default="jobmanager", show_default=True)
@click.option(
    "--no-kill-job-on-completion",
    is_flag=True,
    help="The job does not end when the job manager does.",
)
@click.option("--not-exclusive", is_flag=True, help="Other tasks may share the job manager's TVM.")
@click.option(
    "--on-all-tasks-complete",
    type=click.Choice(["noaction", "terminatejob"]),
    default="noaction",
    show_default=True,
)
@click.option("--uses-task-dependencies", "deps", is_flag=True, help="Tasks may have dependsOn.")
@click.option(
    "--max-parallel-tasks",
    type=int,
    default=-1,
    show_default=True,
    help="The most tasks of a job that run at once (its job manager not counted); -1: no limit.",
)
@credentials
@output_option
def workitem_add(
    name: str,
    pool_name: str,
    priority: int,
    max_task_retries: int | None,
    max_wall_clock: str | None,
    recurrence: str | None,
    do_not_run_until: str | None,
    do_not_run_after: str | None,
    start_window: str | None,
    jm_command: str | None,
    jm_name: str,
    no_kill_job_on_completion: bool,
    not_exclusive: bool,
    on_all_tasks_complete: str,
    deps: bool,
    max_parallel_tasks: int,
    output: str,
    **cred: Any,
) -> None:
    """Add a workitem; without a schedule its job job-0000000001 starts at once."""
    from coordinator.common import models as m

    c = _mk(**cred)
    extra: dict[str, Any] = {"on_all_tasks_complete": on_all_tasks_complete}
    extra["uses_task_dependencies"] = deps
    extra["max_parallel_tasks"] = max_parallel_tasks
    if max_task_retries is not None or max_wall_clock:
        extra["job_constraints"] = m.JobConstraints(
            max_task_retry_count=max_task_retries, max_wall_clock_time=max_wall_clock
        )
    if recurrence or do_not_run_until or do_not_run_after or start_window:
        extra["schedule"] = m.Schedule(
            recurrence_interval=recurrence,
            do_not_run_until=do_not_run_until,
            do_not_run_after=do_not_run_after,
            start_window=start_window,
        )
    if jm_command:
        extra["job_manager"] = m.JobManager(
            name=jm_name,
            command_line=jm_command,
            kill_job_on_completion=not no_kill_job_on_completion,
            run_exclusive=not not_exclusive,
        )
    _emit(output, _run(lambda: c.workitems.add(name, pool_name, priority=priority, **extra)))


@workitem.command("list")
@credentials
@output_option
def workitem_list(output: str, **cred: Any) -> None:
    """List workitems."""
    c = _mk(**cred)
    _emit(output, _run(c.workitems.list), WI_COLS)


@workitem.command("show")
@click.argument("name")
@credentials
@output_option
def workitem_show(name: str, output: str, **cred: Any) -> None:
    """Show one workitem."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.workitems.get(name)))


@workitem.command("delete")
@click.argument("name")
@credentials
@output_option
def workitem_delete(name: str, output: str, **cred: Any) -> None:
    """Delete a workitem, its jobs and tasks (running tasks are killed)."""
    c = _mk(**cred)
    _run(lambda: c.workitems.delete(name))
    _emit(output, {"deleted": name})


@workitem.command("update")
@click.argument("name")
@click.option("--priority", type=int, default=None, help="-1000..1000 (jobs created from now on).")
@click.option(
    "--max-parallel-tasks", type=int, default=None, help="-1 (no limit) or at least 1 (likewise)."
)
@credentials
@output_option
def workitem_update(
    name: str, priority: int | None, max_parallel_tasks: int | None, output: str, **cred: Any
) -> None:
    """Change a workitem (applies to jobs it creates later)."""
    c = _mk(**cred)
    _emit(
        output,
        _run(
            lambda: c.workitems.update(
                name, priority=priority, max_parallel_tasks=max_parallel_tasks
            )
        ),
    )


def _wi_action(verb: str, doc: str) -> None:
    @workitem.command(verb, help=doc)
    @click.argument("name")
    @credentials
    @output_option
    def _cmd(name: str, output: str, **cred: Any) -> None:
        c = _mk(**cred)
        _run(lambda: getattr(c.workitems, verb)(name))
        _emit(output, {verb + "d" if verb.endswith("e") else verb: name})


_wi_action(
    "terminate",
    "Terminate a workitem: its active job ends (reason TerminateJobSchedule), no new jobs.",
)
_wi_action("disable", "Disable a workitem: no new jobs (a running job continues).")
_wi_action("enable", "Enable a disabled workitem.")


@click.group(context_settings=CONTEXT)
def job() -> None:
    """Jobs of a workitem."""


@job.command("list")
@click.argument("workitem_name")
@credentials
@output_option
def job_list(workitem_name: str, output: str, **cred: Any) -> None:
    """List the jobs of a workitem."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.jobs.list(workitem_name)), JOB_COLS)


@job.command("show")
@click.argument("workitem_name")
@click.argument("name")
@credentials
@output_option
def job_show(workitem_name: str, name: str, output: str, **cred: Any) -> None:
    """Show one job with its task counts."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.jobs.get(workitem_name, name)))


@job.command("update")
@click.argument("workitem_name")
@click.argument("name")
@click.option("--priority", type=int, default=None, help="-1000..1000")
@click.option(
    "--on-all-tasks-complete", type=click.Choice(["noaction", "terminatejob"]), default=None
)
@click.option(
    "--max-parallel-tasks",
    type=int,
    default=None,
    help="The most of its tasks that run at once (-1: no limit); from its next placement on.",
)
@credentials
@output_option
def job_update(
    workitem_name: str,
    name: str,
    priority: int | None,
    on_all_tasks_complete: str | None,
    max_parallel_tasks: int | None,
    output: str,
    **cred: Any,
) -> None:
    """Change a job's priority, all-tasks-complete action or maxParallelTasks."""
    c = _mk(**cred)
    _emit(
        output,
        _run(
            lambda: c.jobs.update(
                workitem_name,
                name,
                priority=priority,
                on_all_tasks_complete=on_all_tasks_complete,
                max_parallel_tasks=max_parallel_tasks,
            )
        ),
    )


@job.command("terminate")
@click.argument("workitem_name")
@click.argument("name")
@click.option("--reason", default=None, help="terminateReason (default UserTerminate).")
@credentials
@output_option
def job_terminate(
    workitem_name: str, name: str, reason: str | None, output: str, **cred: Any
) -> None:
    """Terminate a job: running tasks are killed, active ones never run."""
    c = _mk(**cred)
    _run(lambda: c.jobs.terminate(workitem_name, name, reason=reason))
    _emit(output, {"terminated": f"{workitem_name}/{name}"})


@job.command("disable")
@click.argument("workitem_name")
@click.argument("name")
@click.option(
    "--tasks",
    "disable_tasks",
    type=click.Choice(["requeue", "terminate", "wait"]),
    default="requeue",
    show_default=True,
    help="What happens to running tasks.",
)
@credentials
@output_option
def job_disable(
    workitem_name: str, name: str, disable_tasks: str, output: str, **cred: Any
) -> None:
    """Disable a job: no task starts until it is enabled."""
    c = _mk(**cred)
    _run(lambda: c.jobs.disable(workitem_name, name, disable_tasks=disable_tasks))
    _emit(output, {"disabled": f"{workitem_name}/{name}"})


@job.command("enable")
@click.argument("workitem_name")
@click.argument("name")
@credentials
@output_option
def job_enable(workitem_name: str, name: str, output: str, **cred: Any) -> None:
    """Enable a disabled job."""
    c = _mk(**cred)
    _run(lambda: c.jobs.enable(workitem_name, name))
    _emit(output, {"enabled": f"{workitem_name}/{name}"})


@job.command("delete")
@click.argument("workitem_name")
@click.argument("name")
@credentials
@output_option
def job_delete(workitem_name: str, name: str, output: str, **cred: Any) -> None:
    """Delete a job, its tasks and their files (running tasks are killed)."""
    c = _mk(**cred)
    _run(lambda: c.jobs.delete(workitem_name, name))
    _emit(output, {"deleted": f"{workitem_name}/{name}"})
