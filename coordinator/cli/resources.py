"""`tvm pool|tvm|status ...`: thin commands over the Python client (workitems and jobs:
jobs.py)."""

from __future__ import annotations

import json
from typing import Any

import click

from . import jobs
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


def register(cli: click.Group) -> None:
    for group in (pool, tvm, jobs.workitem, jobs.job, status):
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
    extra = {"start_task": m.StartTask(command_line=start_task)} if start_task is not None else {}
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
