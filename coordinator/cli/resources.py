"""`tvm pool|tvm|workitem|job|status ...`: thin commands over the Python client."""

from __future__ import annotations

import json
from typing import Any

import click

from ._common import CONTEXT, _emit, _mk, _run, credentials, output_option

POOL_COLS = [
    ("name", lambda p: p.name),
    ("state", lambda p: p.state),
    ("allocation", lambda p: p.allocation_state),
    ("size", lambda p: p.vm_size),
    ("target", lambda p: p.target_dedicated),
    ("current", lambda p: p.current_dedicated),
    ("tasks/VM", lambda p: p.max_tasks_per_vm),
]
TVM_COLS = [
    ("name", lambda t: t.name),
    ("state", lambda t: t.state),
    ("ip", lambda t: t.ip_address),
    ("running", lambda t: t.running_tasks_count),
    ("total run", lambda t: t.total_tasks_run),
    ("host", lambda t: t.hostname),
]
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


def register(cli: click.Group) -> None:
    for group in (pool, tvm, workitem, job, status):
        cli.add_command(group)


# --------------------------------------------------------------------------- pools


@click.group(context_settings=CONTEXT)
def pool() -> None:
    """Pools of TVMs."""


@pool.command("add")
@click.argument("name")
@click.option("--vm-size", default="small", show_default=True, help="small|medium|large|extralarge")
@click.option(
    "--target", "target_dedicated", default=0, show_default=True, help="Target number of TVMs."
)
@click.option("--max-tasks-per-vm", default=1, show_default=True)
@click.option(
    "--fill",
    "tvm_fill_type",
    type=click.Choice(["spread", "pack"]),
    default="spread",
    show_default=True,
)
@click.option("--start-task", default=None, help="Command line run on every TVM before tasks.")
@credentials
@output_option
def pool_add(
    name: str,
    vm_size: str,
    target_dedicated: int,
    max_tasks_per_vm: int,
    tvm_fill_type: str,
    start_task: str | None,
    output: str,
    **cred: Any,
) -> None:
    """Add a pool."""
    from coordinator.common import models as m

    c = _mk(**cred)
    extra = {"start_task": m.StartTask(command_line=start_task)} if start_task else {}
    p = _run(
        lambda: c.pools.add(
            name,
            vm_size=vm_size,
            target_dedicated=target_dedicated,
            max_tasks_per_vm=max_tasks_per_vm,
            tvm_fill_type=tvm_fill_type,
            **extra,
        )
    )
    _emit(output, p)


@pool.command("list")
@credentials
@output_option
def pool_list(output: str, **cred: Any) -> None:
    """List pools."""
    c = _mk(**cred)
    _emit(output, _run(c.pools.list), POOL_COLS)


@pool.command("show")
@click.argument("name")
@credentials
@output_option
def pool_show(name: str, output: str, **cred: Any) -> None:
    """Show one pool."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.pools.get(name)))


@pool.command("resize")
@click.argument("name")
@click.argument("target", type=int)
@click.option(
    "--deallocation",
    type=click.Choice(["requeue", "terminate", "taskcompletion"]),
    default="requeue",
)
@credentials
@output_option
def pool_resize(name: str, target: int, deallocation: str, output: str, **cred: Any) -> None:
    """Change a pool's target TVM count."""
    c = _mk(**cred)
    _run(lambda: c.pools.resize(name, target, tvm_deallocation_option=deallocation))
    _emit(output, {"name": name, "targetDedicated": target})


@pool.command("delete")
@click.argument("name")
@credentials
@output_option
def pool_delete(name: str, output: str, **cred: Any) -> None:
    """Delete a pool (its TVMs return to the free inventory)."""
    c = _mk(**cred)
    _run(lambda: c.pools.delete(name))
    _emit(output, {"deleted": name})


_OPTION = click.Choice(["requeue", "terminate", "taskcompletion"])


@pool.command("stop-resize")
@click.argument("name")
@credentials
@output_option
def pool_stop_resize(name: str, output: str, **cred: Any) -> None:
    """Stop a resize: keep the TVMs the pool has now."""
    c = _mk(**cred)
    _run(lambda: c.pools.stop_resize(name))
    _emit(output, {"name": name, "stopped": True})


@pool.command("remove-tvms")
@click.argument("name")
@click.argument("tvm_names", nargs=-1, required=True)
@click.option(
    "--deallocation",
    type=_OPTION,
    default="requeue",
    show_default=True,
    help="What happens to tasks running on the removed TVMs.",
)
@credentials
@output_option
def pool_remove_tvms(
    name: str, tvm_names: tuple[str, ...], deallocation: str, output: str, **cred: Any
) -> None:
    """Remove named TVMs from a pool (its target shrinks accordingly)."""
    c = _mk(**cred)
    _run(lambda: c.pools.remove_tvms(name, list(tvm_names), tvm_deallocation_option=deallocation))
    _emit(output, {"name": name, "removing": list(tvm_names)})


@pool.command("vm-sizes")
@credentials
@output_option
def pool_vm_sizes(output: str, **cred: Any) -> None:
    """List VM sizes: built-ins plus the real size of each registered agent."""
    c = _mk(**cred)
    _emit(
        output,
        _run(c.pools.vm_sizes),
        [
            ("name", lambda s: s.name),
            ("cores", lambda s: s.cores),
            ("memoryMiB", lambda s: s.memory_mib),
            ("maxTasksPerVM", lambda s: s.max_tasks_per_vm),
            ("source", lambda s: s.source),
        ],
    )


@pool.group("autoscale", context_settings=CONTEXT)
def pool_autoscale() -> None:
    """Autoscale formulas: enable, disable, evaluate (issue 7)."""


def _formula(formula: str | None, formula_file: str | None) -> str | None:
    if formula is not None and formula_file is not None:
        raise click.UsageError("give --formula or --formula-file, not both")
    if formula_file is not None:
        with open(formula_file, encoding="utf-8") as f:
            return f.read()
    return formula


@pool_autoscale.command("enable")
@click.argument("name")
@click.option(
    "--formula", default=None, help="The formula text (required unless autoscale is already on)."
)
@click.option(
    "--formula-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Read the formula from this file.",
)
@click.option(
    "--interval",
    default=None,
    help="Evaluation interval, ISO 8601 (PT5M .. PT168H; default PT15M).",
)
@credentials
@output_option
def pool_autoscale_enable(
    name: str,
    formula: str | None,
    formula_file: str | None,
    interval: str | None,
    output: str,
    **cred: Any,
) -> None:
    """Turn autoscale on for a pool, or change its formula or interval; the formula runs at once."""
    text = _formula(formula, formula_file)
    c = _mk(**cred)
    _run(lambda: c.pools.enable_autoscale(name, text, evaluation_interval=interval))
    p = _run(lambda: c.pools.get(name))
    _emit(
        output,
        {"name": name, "targetDedicated": p.target_dedicated, "autoScaleRun": p.auto_scale_run},
    )


@pool_autoscale.command("disable")
@click.argument("name")
@credentials
@output_option
def pool_autoscale_disable(name: str, output: str, **cred: Any) -> None:
    """Turn autoscale off (the target stays where the last run put it)."""
    c = _mk(**cred)
    _run(lambda: c.pools.disable_autoscale(name))
    _emit(output, {"name": name, "enableAutoScale": False})


@pool_autoscale.command("evaluate")
@click.argument("name")
@click.option("--formula", default=None, help="The formula text.")
@click.option(
    "--formula-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Read the formula from this file.",
)
@credentials
@output_option
def pool_autoscale_evaluate(
    name: str, formula: str | None, formula_file: str | None, output: str, **cred: Any
) -> None:
    """Evaluate a formula on the pool's current metrics without applying it."""
    text = _formula(formula, formula_file)
    if text is None:
        raise click.UsageError("give --formula or --formula-file")
    c = _mk(**cred)
    _emit(output, _run(lambda: c.pools.evaluate_autoscale(name, text)))


# --------------------------------------------------------------------------- TVMs


@click.group(context_settings=CONTEXT)
def tvm() -> None:
    """Task virtual machines of a pool."""


@tvm.command("list")
@click.argument("pool_name")
@credentials
@output_option
def tvm_list(pool_name: str, output: str, **cred: Any) -> None:
    """List the TVMs of a pool."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.tvms.list(pool_name)), TVM_COLS)


@tvm.command("show")
@click.argument("pool_name")
@click.argument("name")
@credentials
@output_option
def tvm_show(pool_name: str, name: str, output: str, **cred: Any) -> None:
    """Show one TVM."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.tvms.get(pool_name, name)))


def _tvm_op(verb: str, doc: str, with_option: bool = True) -> None:
    """Register `tvm tvm VERB POOL NAME [--option ...]` (issue 5 TVM operations)."""

    def run(pool_name: str, name: str, output: str, option: str = "requeue", **cred: Any) -> None:
        c = _mk(**cred)
        method = getattr(c.tvms, verb.replace("-", "_"))
        _run(
            lambda: (
                method(pool_name, name, option=option) if with_option else method(pool_name, name)
            )
        )
        _emit(output, {"pool": pool_name, "tvm": name, "operation": verb})

    run.__doc__ = doc
    cmd = click.argument("name")(output_option(credentials(run)))
    if with_option:
        cmd = click.option(
            "--option",
            type=_OPTION,
            default="requeue",
            show_default=True,
            help="What happens to tasks running on the TVM.",
        )(cmd)
    tvm.command(verb)(click.argument("pool_name")(cmd))


_tvm_op("reboot", "Reboot a TVM: its processes are killed and the start task runs again.")
_tvm_op("reimage", "Reimage a TVM: like reboot, and its task/shared/start directories are wiped.")
_tvm_op("disable-scheduling", "Take a TVM offline: no new tasks go there.")
_tvm_op("enable-scheduling", "Let tasks go to a TVM again.", with_option=False)
_tvm_op("delete", "Remove a TVM from its pool (the pool's target shrinks by one).")


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
    output: str,
    **cred: Any,
) -> None:
    """Add a workitem; without a schedule its job job-0000000001 starts at once."""
    from coordinator.common import models as m

    c = _mk(**cred)
    extra: dict[str, Any] = {"on_all_tasks_complete": on_all_tasks_complete}
    extra["uses_task_dependencies"] = deps
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
@credentials
@output_option
def workitem_update(name: str, priority: int | None, output: str, **cred: Any) -> None:
    """Change a workitem (applies to jobs it creates later)."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.workitems.update(name, priority=priority)))


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
@credentials
@output_option
def job_update(
    workitem_name: str,
    name: str,
    priority: int | None,
    on_all_tasks_complete: str | None,
    output: str,
    **cred: Any,
) -> None:
    """Change a job's priority or all-tasks-complete action."""
    c = _mk(**cred)
    _emit(
        output,
        _run(
            lambda: c.jobs.update(
                workitem_name, name, priority=priority, on_all_tasks_complete=on_all_tasks_complete
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


@click.command(context_settings=CONTEXT)
@click.option(
    "--stale-after",
    default=30.0,
    show_default=True,
    help="Flag TVMs whose last heartbeat is older than this many seconds.",
)
@credentials
@output_option
def status(output: str, stale_after: float, **cred: Any) -> None:
    """Summarise the cluster: pools, TVMs by state, queued/running tasks, agent health per TVM."""
    c = _mk(**cred)
    summary = _run(c.ops.status)
    if output == "json":
        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = summary["tasks"]
    console.print(
        f"account {summary['account']}: {summary['agentsConnected']} agent(s) connected "
        f"({summary['agentsFree']} free); tasks: {t['queueDepth']} queued, {t['running']} running, "
        f"{t['succeeded']} succeeded, {t['failed']} failed; "
        f"{summary['placementsPerSecond']:g} placements/s"
        + (
            "; RECOVERING (waiting for agents to report after a restart)"
            if summary["recovering"]
            else ""
        ),
        highlight=False,
    )
    for p in summary["pools"]:
        states = ", ".join(f"{k} {v}" for k, v in sorted(p["tvms"].items())) or "no TVMs"
        console.print(
            f"pool {p['name']}: {p['current']}/{p['target']} TVMs ({p['allocationState']}): {states}",
            highlight=False,
        )
    if not summary["tvms"]:
        return
    table = Table(title="agent health per TVM")
    for col in ("pool", "tvm", "state", "agent", "link", "last heartbeat", "rtt", "running"):
        table.add_column(col)
    for tv in summary["tvms"]:
        age = tv["lastHeartbeatAgeSeconds"]
        if not tv["agentConnected"]:
            health = "disconnected"
        elif age is not None and age > stale_after:
            health = "STALE"
        else:
            health = "ok"
        rtt = tv["linkRttSeconds"]
        table.add_row(
            tv["pool"],
            tv["name"],
            tv["state"],
            tv["agentId"],
            health,
            "never" if age is None else f"{age:.1f} s ago",
            "" if rtt is None else f"{rtt * 1000:.2f} ms",
            str(tv["runningTasks"]),
        )
    console.print(table)
    for tv in summary["tvms"]:  # said per TVM, in full: a degraded host is never silent
        if tv.get("stateReason"):
            console.print(
                f"{tv['state'].upper()} {tv['pool']}/{tv['name']}: {tv['stateReason']}",
                highlight=False,
                soft_wrap=True,
            )
        for mode in tv.get("degradedModes") or []:
            console.print(
                f"DEGRADED {tv['pool']}/{tv['name']}: {mode}", highlight=False, soft_wrap=True
            )
