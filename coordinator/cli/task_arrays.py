"""`tvm task add-array` and the failure report of `tvm task wait` (names and array indexes)."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from ._common import _emit, _mk, _run, credentials, output_option
from .tasks import TaskSettings, _task_opts, task

SHOWN_FAILURES = 20


@task.command("add-array")
@click.argument("workitem_name")
@click.argument("job_name")
@click.option(
    "--range",
    "range_text",
    required=True,
    help="Indexes START-END[:STEP] (inclusive), e.g. 1-10000 or 0-998:2.",
)
@click.option(
    "--prefix",
    default="",
    help="Task names are PREFIX + index (default: the index alone, so dependsOn ranges match).",
)
@click.argument("command", nargs=-1, required=True)
@_task_opts
@credentials
@output_option
def task_add_array(
    workitem_name: str,
    job_name: str,
    range_text: str,
    prefix: str,
    command: tuple[str, ...],
    settings: TaskSettings,
    output: str,
    **cred: Any,
) -> None:
    """Add a task array: `-- CMD {}` runs once per index, with the index in every `{}` and in
    TVM_TASK_INDEX and BATCH_TASK_INDEX. One argument is used as the command line as it is; several
    are joined with shell quoting. Added in collections of 100, with a progress bar on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from coordinator.client import add_array, array_specs, parse_range

    try:
        indexes = parse_range(range_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--range") from None
    line = command[0] if len(command) == 1 else shlex.join(command)
    try:
        specs = array_specs(
            line,
            indexes,
            prefix=prefix,
            **settings.client_kwargs(),
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    c = _mk(**cred)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]adding"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        disable=output == "json" or not console.is_terminal,
    ) as bar:
        tid = bar.add_task("add", total=len(specs))
        results = _run(
            lambda: add_array(
                c, workitem_name, job_name, specs, lambda done, _n: bar.update(tid, completed=done)
            )
        )
    failed = [r for r in results if r.status != "success"]
    if output == "json":
        _emit(output, results)
    else:
        step = f":{indexes.step}" if indexes.step != 1 else ""
        click.echo(
            f"added {len(results) - len(failed)} task(s) of the array "
            f"{indexes.start}-{indexes[-1]}{step}, {len(failed)} refused"
        )
        for r in failed[:SHOWN_FAILURES]:
            click.echo(f"  {r.name}: {r.error}", err=True)
    if failed:
        sys.exit(1)


def _index(t: Any) -> str | None:
    for e in t.environment_settings or ():
        if e.name == "TVM_TASK_INDEX":
            return str(e.value)
    return None


def report_failures(c: Any, workitem: str, job: str) -> None:
    """Name the failed tasks (with their array index) and the ones their failures block."""
    done = _run(lambda: c.tasks.list(workitem, job, state="completed"))
    failed = [
        t
        for t in done
        if t.execution_info is not None
        and (t.execution_info.exit_code != 0 or t.execution_info.scheduling_error is not None)
    ]
    for t in failed[:SHOWN_FAILURES]:
        info = t.execution_info
        why = (
            f"{info.scheduling_error.code}: {info.scheduling_error.message}"
            if info.scheduling_error
            else f"exit code {info.exit_code}"
        )
        idx = _index(t)
        click.echo(f"  failed: {t.name}{f' (index {idx})' if idx else ''}: {why}", err=True)
    if len(failed) > SHOWN_FAILURES:
        click.echo(f"  ... and {len(failed) - SHOWN_FAILURES} more failed", err=True)
    blocked = [
        t for t in _run(lambda: c.tasks.list(workitem, job, state="active")) if t.dependency_state
    ]
    if blocked:
        click.echo(f"  {len(blocked)} task(s) wait for dependencies that failed:", err=True)
        for t in blocked[:SHOWN_FAILURES]:
            click.echo(f"    {t.name}: {t.dependency_reason}", err=True)
