"""`tvm task|file ...`: thin commands over the Python client."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

import click

from ._common import CONTEXT, Seconds, _emit, _mk, _run, credentials, output_option

TASK_COLS = [
    ("name", lambda t: t.name),
    ("state", lambda t: t.state),
    ("exit", lambda t: t.execution_info.exit_code if t.execution_info else None),
    ("retries", lambda t: t.execution_info.retry_count if t.execution_info else 0),
    ("tvm", lambda t: t.tvm_info.tvm_name if t.tvm_info else None),
    ("waits", lambda t: t.dependency_state),  # waiting | blocked (dependencies)
    ("command", lambda t: t.command_line[:60]),
]
FILE_COLS = [
    ("name", lambda f: f.name),
    ("dir", lambda f: "d" if f.is_directory else ""),
    ("size", lambda f: f.properties.content_length if f.properties else ""),
    ("modified", lambda f: f.properties.last_modified if f.properties else ""),
]


def register(cli: click.Group) -> None:
    from . import task_arrays  # noqa: F401 (adds `task add-array` to the group)

    for group in (task, file):
        cli.add_command(group)


# --------------------------------------------------------------------------- tasks


@click.group(context_settings=CONTEXT)
def task() -> None:
    """Tasks of a job."""


@dataclass(frozen=True)
class TaskSettings:
    """The options every task-adding command takes (see `_task_opts`)."""

    env: tuple[str, ...]
    max_wall_clock: str | None
    max_retries: int | None
    retention: str | None

    def client_kwargs(self) -> dict[str, Any]:
        """As the client's keyword arguments; a malformed --env is refused here."""
        return {
            "env": _env(self.env),
            "max_wall_clock_time": self.max_wall_clock,
            "max_task_retry_count": self.max_retries,
            "retention_time": self.retention,
        }


def _task_opts(f: Any) -> Any:
    """--env, --max-wall-clock, --max-retries and --retention, handed to the command as one
    `settings: TaskSettings` argument."""

    @functools.wraps(f)
    def command(
        *args: Any,
        env: tuple[str, ...],
        max_wall_clock: str | None,
        max_retries: int | None,
        retention: str | None,
        **kwargs: Any,
    ) -> Any:
        settings = TaskSettings(env, max_wall_clock, max_retries, retention)
        return f(*args, settings=settings, **kwargs)

    c: Any = command
    c = click.option("--env", "-e", multiple=True, help="NAME=VALUE (repeatable).")(c)
    c = click.option("--max-wall-clock", default=None, help="ISO 8601 duration, e.g. PT10M.")(c)
    c = click.option(
        "--max-retries", type=int, default=None, help="maxTaskRetryCount (-1: unlimited)."
    )(c)
    c = click.option(
        "--retention", default=None, help="ISO 8601 duration to keep files (default P7D)."
    )(c)
    return c


def _depends_opt(f: Any) -> Any:
    return click.option(
        "--depends-on",
        multiple=True,
        help="A task this one waits for (repeatable; the workitem needs --uses-task-dependencies).",
    )(f)


def _env(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"{p!r} is not NAME=VALUE", param_hint="--env")
        k, v = p.split("=", 1)
        out[k] = v
    return out


@task.command("add")
@click.argument("workitem_name")
@click.argument("job_name")
@click.argument("name")
@click.argument("command_line")
@_task_opts
@_depends_opt
@click.option(
    "--output-file",
    "output_files",
    multiple=True,
    help="Upload files matching this pattern after the task (repeatable; `**`, `*`, `?`;"
    " ../std*.txt for its stdout/stderr): to --output-container, else to the file store.",
)
@click.option("--output-container", default=None, help="Container URL (with its SAS query).")
@click.option("--output-path", default=None, help="Blob name or prefix for --output-file.")
@click.option(
    "--upload-condition",
    type=click.Choice(["tasksuccess", "taskfailure", "taskcompletion"]),
    default="taskcompletion",
    show_default=True,
)
@click.option("--slots", type=int, default=1, show_default=True, help="requiredSlots.")
@click.option("--instances", type=int, default=None, help="A multi-instance task on N TVMs.")
@click.option(
    "--coordination",
    default=None,
    help="Its coordination command line (runs on every TVM; the command line starts once all "
    "coordination commands have started, not returned as in Azure Batch).",
)
@click.option(
    "--affinity",
    default=None,
    help="A TVM's name: the task runs there when it has a free slot (a hint: else elsewhere).",
)
@credentials
@output_option
def task_add(
    workitem_name: str,
    job_name: str,
    name: str,
    command_line: str,
    depends_on: tuple[str, ...],
    settings: TaskSettings,
    output_files: tuple[str, ...],
    output_container: str | None,
    output_path: str | None,
    upload_condition: str,
    slots: int,
    instances: int | None,
    coordination: str | None,
    affinity: str | None,
    output: str,
    **cred: Any,
) -> None:
    """Add one task. The command line runs without a shell (use `/bin/sh -c '...'` for one)."""
    from coordinator.client import output_file

    outputs = [
        output_file(p, container_url=output_container, path=output_path, condition=upload_condition)
        for p in output_files
    ]
    c = _mk(**cred)
    _run(
        lambda: c.tasks.add(
            workitem_name,
            job_name,
            name,
            command_line,
            **settings.client_kwargs(),
            depends_on=list(depends_on) or None,
            output_files=outputs,
            required_slots=slots,
            instances=instances,
            coordination_command_line=coordination,
            affinity_id=affinity,
        )
    )
    _emit(output, {"added": name})


@task.command("add-many")
@click.argument("workitem_name")
@click.argument("job_name")
@click.option(
    "--file",
    "path",
    type=click.File("r"),
    default="-",
    show_default=True,
    help="One command line per line, or JSON lines of TaskAdd objects.",
)
@click.option(
    "--prefix", default="task", show_default=True, help="Name prefix for plain command lines."
)
@_task_opts
@credentials
@output_option
def task_add_many(
    workitem_name: str,
    job_name: str,
    path: Any,
    prefix: str,
    settings: TaskSettings,
    output: str,
    **cred: Any,
) -> None:
    """Add many tasks (chunked into collections of 100)."""
    import msgspec

    from coordinator.client import task_spec
    from coordinator.common import models as m

    specs = []
    for i, line in enumerate(x for x in path.read().splitlines() if x.strip()):
        if line.lstrip().startswith("{"):
            try:
                specs.append(msgspec.json.decode(line, type=m.TaskAdd))
            except msgspec.ValidationError as exc:
                raise click.ClickException(f"line {i + 1}: {exc}") from None
        else:
            specs.append(
                task_spec(
                    f"{prefix}-{i:06d}",
                    line,
                    **settings.client_kwargs(),
                )
            )
    c = _mk(**cred)
    results = _run(lambda: c.tasks.add_many(workitem_name, job_name, specs))
    failed = [r for r in results if r.status != "success"]
    if output == "json":
        _emit(output, results)
    else:
        click.echo(f"added {len(results) - len(failed)} task(s), {len(failed)} refused")
        for r in failed[:20]:
            click.echo(f"  {r.name}: {r.error}", err=True)
    if failed:
        sys.exit(1)


@task.command("list")
@click.argument("workitem_name")
@click.argument("job_name")
@click.option("--state", type=click.Choice(["active", "running", "completed"]), default=None)
@credentials
@output_option
def task_list(
    workitem_name: str, job_name: str, state: str | None, output: str, **cred: Any
) -> None:
    """List tasks, optionally by state."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.tasks.list(workitem_name, job_name, state=state)), TASK_COLS)


@task.command("show")
@click.argument("workitem_name")
@click.argument("job_name")
@click.argument("name")
@credentials
@output_option
def task_show(workitem_name: str, job_name: str, name: str, output: str, **cred: Any) -> None:
    """Show one task."""
    c = _mk(**cred)
    _emit(output, _run(lambda: c.tasks.get(workitem_name, job_name, name)))


@task.command("terminate")
@click.argument("workitem_name")
@click.argument("job_name")
@click.argument("name")
@credentials
@output_option
def task_terminate(workitem_name: str, job_name: str, name: str, output: str, **cred: Any) -> None:
    """Terminate a task (a running one is killed)."""
    c = _mk(**cred)
    _run(lambda: c.tasks.terminate(workitem_name, job_name, name))
    _emit(output, {"terminated": name})


@task.command("delete")
@click.argument("workitem_name")
@click.argument("job_name")
@click.argument("name")
@credentials
@output_option
def task_delete(workitem_name: str, job_name: str, name: str, output: str, **cred: Any) -> None:
    """Delete a task and its files."""
    c = _mk(**cred)
    _run(lambda: c.tasks.delete(workitem_name, job_name, name))
    _emit(output, {"deleted": name})


@task.command("wait")
@click.argument("workitem_name")
@click.argument("job_name")
@click.option(
    "--timeout",
    type=Seconds(),
    default=None,
    help="Give up after this many seconds (0: look once) [wait as long as it takes].",
)
@credentials
@output_option
def task_wait(
    workitem_name: str, job_name: str, timeout: float | None, output: str, **cred: Any
) -> None:
    """Wait until every task of the job completed; exit 1 if any failed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    c = _mk(**cred)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        disable=output == "json",
    ) as bar:
        tid = bar.add_task(f"{workitem_name}/{job_name}", total=None, detail="")

        def show(cn: Any) -> None:
            total = cn.active + cn.running + cn.completed
            bar.update(
                tid,
                total=total,
                completed=cn.completed,
                detail=f"{cn.running} running, {cn.active} active, {cn.failed} failed",
            )

        counts = _run(lambda: c.tasks.wait(workitem_name, job_name, timeout=timeout, progress=show))
    _emit(output, counts) if output == "json" else click.echo(
        f"{counts.completed} completed: {counts.succeeded} succeeded, {counts.failed} failed"
        + (f", {counts.active} blocked by failed dependencies" if counts.active else "")
    )
    if counts.failed:
        if output != "json":
            from .task_arrays import report_failures

            report_failures(c, workitem_name, job_name)
        sys.exit(1)


# --------------------------------------------------------------------------- files


@click.group(context_settings=CONTEXT)
def file() -> None:
    """Files of tasks and TVMs, and the coordinator's file store."""


@file.command("list")
@click.argument("workitem_name")
@click.argument("job_name")
@click.argument("task_name")
@click.option("--recursive", "-r", is_flag=True)
@credentials
@output_option
def file_list(
    workitem_name: str, job_name: str, task_name: str, recursive: bool, output: str, **cred: Any
) -> None:
    """List a task's files."""
    c = _mk(**cred)
    _emit(
        output,
        _run(
            lambda: c.files.list_from_task(workitem_name, job_name, task_name, recursive=recursive)
        ),
        FILE_COLS,
    )


@file.command("get")
@click.argument("workitem_name")
@click.argument("job_name")
@click.argument("task_name")
@click.argument("path")
@click.option(
    "--dest", type=click.Path(dir_okay=False), default=None, help="Write here instead of stdout."
)
@click.option("--range", "byte_range", default=None, help="START-END byte range (inclusive).")
@credentials
def file_get(
    workitem_name: str,
    job_name: str,
    task_name: str,
    path: str,
    dest: str | None,
    byte_range: str | None,
    **cred: Any,
) -> None:
    """Get a task's file (e.g. stdout.txt)."""
    rng = None
    if byte_range:
        try:
            a, b = byte_range.split("-")
            rng = (int(a), int(b))
        except ValueError:
            raise click.BadParameter("use START-END, e.g. 0-1023", param_hint="--range") from None
    c = _mk(**cred)
    data = _run(
        lambda: c.files.get_from_task(workitem_name, job_name, task_name, path, byte_range=rng)
    )
    if dest:
        with open(dest, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)


@file.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@credentials
@output_option
def file_upload(path: str, output: str, **cred: Any) -> None:
    """Upload a file to the coordinator's file store; prints the blobSource to use in resourceFiles."""
    import hashlib

    with open(path, "rb") as f:
        data = f.read()
    c = _mk(**cred)
    res = _run(lambda: c.files.upload(data, sha256=hashlib.sha256(data).hexdigest()))
    _emit(output, res) if output == "json" else click.echo(res["blobSource"])
