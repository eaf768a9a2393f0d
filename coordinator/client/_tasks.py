"""Tasks and files groups of the client, and the helpers for many tasks (chunks, add_many, wait)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import httpx2
import msgspec

from coordinator.common import models as m

from ._http import (
    BatchError,
    _Call,
    _Group,
    _list,
    _one,
    _seg,
)

if TYPE_CHECKING:
    from ._client import AsyncClient, Client


def task_spec(
    name: str,
    command_line: str,
    *,
    env: dict[str, str] | None = None,
    resource_files: Sequence[m.ResourceFile] = (),
    max_wall_clock_time: str | None = None,
    max_task_retry_count: int | None = None,
    retention_time: str | None = None,
    run_elevated: bool = False,
    depends_on: Sequence[str] | m.TaskDependencies | None = None,
    exit_conditions: m.ExitConditions | None = None,
    output_files: Sequence[m.OutputFile] = (),
    required_slots: int = 1,
    instances: int | None = None,
    coordination_command_line: str | None = None,
    common_resource_files: Sequence[m.ResourceFile] = (),
    affinity_id: str | None = None,
) -> m.TaskAdd:
    """Build a task for `tasks.add_collection` with keyword arguments. `depends_on`: task names
    (or a `TaskDependencies` with ranges); the job needs `uses_task_dependencies`.
    `output_files`: built with `output_file`. `instances` (with `coordination_command_line`): a
    multi-instance task on that many TVMs of a pool with inter-TVM communication. `affinity_id`:
    a TVM's name the task runs on when that TVM has a free slot (a hint)."""
    constraints = None
    if max_wall_clock_time or max_task_retry_count is not None or retention_time:
        constraints = m.TaskConstraints(
            max_wall_clock_time=max_wall_clock_time,
            max_task_retry_count=max_task_retry_count,
            retention_time=retention_time,
        )
    return m.TaskAdd(
        name=name,
        command_line=command_line,
        environment_settings=[
            m.EnvironmentSetting(name=k, value=v) for k, v in (env or {}).items()
        ],
        resource_files=list(resource_files),
        task_constraints=constraints,
        run_elevated=run_elevated,
        depends_on=(
            depends_on
            if isinstance(depends_on, m.TaskDependencies) or depends_on is None
            else m.TaskDependencies(task_ids=list(depends_on))
        ),
        exit_conditions=exit_conditions,
        output_files=list(output_files),
        required_slots=required_slots,
        multi_instance_settings=m.MultiInstanceSettings(
            number_of_instances=instances,
            coordination_command_line=coordination_command_line,
            common_resource_files=list(common_resource_files),
        )
        if instances is not None
        else None,
        affinity_id=affinity_id,
    )


def output_file(
    pattern: str,
    *,
    container_url: str | None = None,
    path: str | None = None,
    condition: str = "taskcompletion",
) -> m.OutputFile:
    """Files to upload after the task: to a storage container by its SAS URL (Azure's way), or,
    without `container_url`, to the coordinator's file store (listed on the task's
    `outputFileResults`). `condition`: tasksuccess, taskfailure or taskcompletion."""
    dest = (
        m.OutputFileDestination(
            container=m.OutputFileContainer(container_url=container_url, path=path)
        )
        if container_url
        else m.OutputFileDestination(file_store=m.OutputFileStore(path=path))
    )
    return m.OutputFile(
        file_pattern=pattern,
        destination=dest,
        upload_options=m.OutputFileUploadOptions(upload_condition=condition),
    )


class Tasks(_Group):
    def _base(self, workitem: str, job: str) -> str:
        return f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}"

    def add(self, workitem: str, job: str, name: str, command_line: str, **kw: Any) -> Any:
        return self._c._call(
            _Call("POST", self._base(workitem, job) + "/tasks", task_spec(name, command_line, **kw))
        )

    def add_collection(self, workitem: str, job: str, tasks: Iterable[m.TaskAdd]) -> Any:
        """Add up to 100 tasks in one request; returns per-task results."""
        body = m.TaskAddCollection(value=list(tasks))
        return self._c._call(
            _Call(
                "POST",
                self._base(workitem, job) + "/addtaskcollection",
                body,
                parse=lambda r: (
                    msgspec.json.decode(r.content, type=m.TaskAddCollectionResult).value
                ),
            )
        )

    def list(self, workitem: str, job: str, *, state: str | None = None) -> Any:
        params = {"$filter": f"state eq '{state}'"} if state else None
        return self._c._call(
            _Call("GET", self._base(workitem, job) + "/tasks", params=params, parse=_list(m.Task))
        )

    def get(
        self, workitem: str, job: str, name: str, *, wait_for_completion: float | None = None
    ) -> Any:
        """The task; `wait_for_completion` (seconds, at most 60): the answer comes when the task
        completes or that time is up, whichever is first (no polling)."""
        params = None
        if wait_for_completion is not None:
            # Under the HTTP timeout (60 s by default), so the answer always arrives.
            seconds = min(max(0.0, wait_for_completion), 50.0)
            params = {"waitForCompletion": f"PT{seconds:.3f}S"}
        return self._c._call(
            _Call(
                "GET",
                f"{self._base(workitem, job)}/tasks/{_seg(name)}",
                params=params,
                parse=_one(m.Task),
            )
        )

    def delete(self, workitem: str, job: str, name: str) -> Any:
        return self._c._call(_Call("DELETE", f"{self._base(workitem, job)}/tasks/{_seg(name)}"))

    def terminate(self, workitem: str, job: str, name: str) -> Any:
        return self._c._call(
            _Call("POST", f"{self._base(workitem, job)}/tasks/{_seg(name)}/terminate")
        )

    def update(
        self,
        workitem: str,
        job: str,
        name: str,
        *,
        max_wall_clock_time: str | None = None,
        max_task_retry_count: int | None = None,
        retention_time: str | None = None,
    ) -> Any:
        body = m.TaskUpdate(
            task_constraints=m.TaskConstraints(
                max_wall_clock_time=max_wall_clock_time,
                max_task_retry_count=max_task_retry_count,
                retention_time=retention_time,
            )
        )
        return self._c._call(
            _Call("PATCH", f"{self._base(workitem, job)}/tasks/{_seg(name)}", body)
        )

    def wait(self, workitem: str, job: str, **kw: Any) -> Any:
        """Until every task of the job completed (see `wait_for_tasks`)."""
        if self._c.is_async:
            return wait_for_tasks_async(cast("AsyncClient", self._c), workitem, job, **kw)
        return wait_for_tasks(cast("Client", self._c), workitem, job, **kw)

    def add_array(
        self,
        workitem: str,
        job: str,
        command_line: str,
        indexes: range | Sequence[int] | str,
        *,
        prefix: str = "",
        progress: Callable[[int, int], None] | None = None,
        **kw: Any,
    ) -> Any:
        """A task array: `command_line` once per index (a range, a list, or "START-END[:STEP]"),
        with the index in `{}`, `TVM_TASK_INDEX` and `BATCH_TASK_INDEX`; named `<prefix><index>`.
        Added in collections of 100; returns per-task results. `kw` as for `task_spec`."""
        from ._arrays import add_array, add_array_async, array_specs, parse_range

        if isinstance(indexes, str):
            indexes = parse_range(indexes)
        specs = array_specs(command_line, indexes, prefix=prefix, **kw)
        if self._c.is_async:
            return add_array_async(cast("AsyncClient", self._c), workitem, job, specs, progress)
        return add_array(cast("Client", self._c), workitem, job, specs, progress)

    def add_many(self, workitem: str, job: str, tasks: Sequence[m.TaskAdd]) -> Any:
        """Any number of tasks, chunked into collections of 100."""
        if self._c.is_async:
            return add_many_async(cast("AsyncClient", self._c), workitem, job, tasks)
        return add_many(cast("Client", self._c), workitem, job, tasks)


class Files(_Group):
    def list_from_task(self, workitem: str, job: str, task: str, *, recursive: bool = False) -> Any:
        path = f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/tasks/{_seg(task)}/files"
        return self._c._call(
            _Call(
                "GET", path, params={"recursive": str(recursive).lower()}, parse=_list(m.NodeFile)
            )
        )

    def get_from_task(
        self,
        workitem: str,
        job: str,
        task: str,
        path: str,
        *,
        byte_range: tuple[int, int] | None = None,
    ) -> Any:
        url = f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/tasks/{_seg(task)}/files/{quote(path)}"
        return self._c._call(
            _Call("GET", url, headers=_range(byte_range), parse=lambda r: r.content)
        )

    def list_from_tvm(self, pool: str, tvm: str, *, recursive: bool = False) -> Any:
        return self._c._call(
            _Call(
                "GET",
                f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/files",
                params={"recursive": str(recursive).lower()},
                parse=_list(m.NodeFile),
            )
        )

    def get_from_tvm(
        self, pool: str, tvm: str, path: str, *, byte_range: tuple[int, int] | None = None
    ) -> Any:
        return self._c._call(
            _Call(
                "GET",
                f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/files/{quote(path)}",
                headers=_range(byte_range),
                parse=lambda r: r.content,
            )
        )

    def properties_from_task(self, workitem: str, job: str, task: str, path: str) -> Any:
        """{"size": int, "lastModified": RFC 3339 str} of a task's file (a HEAD request)."""
        url = f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/tasks/{_seg(task)}/files/{quote(path)}"
        return self._c._call(_Call("HEAD", url, parse=_file_props))

    def properties_from_tvm(self, pool: str, tvm: str, path: str) -> Any:
        return self._c._call(
            _Call(
                "HEAD",
                f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/files/{quote(path)}",
                parse=_file_props,
            )
        )

    def download(self, sha256: str, *, byte_range: tuple[int, int] | None = None) -> Any:
        """The bytes of a file in the coordinator's file store (e.g. a task's output file, named on
        its `outputFileResults`)."""
        url = f"/files/sha256/{_seg(sha256)}"
        return self._c._call(
            _Call("GET", url, headers=_range(byte_range), parse=lambda r: r.content)
        )

    def list_stored(self) -> Any:
        """[{sha256, size}] of every file in the coordinator's file store."""
        return self._c._call(_Call("GET", "/files", parse=_list(dict)))

    def upload(self, data: bytes, *, sha256: str | None = None) -> Any:
        """Put bytes in the coordinator's file store; returns {sha256, size, blobSource}."""
        return self._c._call(
            _Call(
                "POST",
                "/files",
                raw=data,
                params={"sha256": sha256} if sha256 else None,
                parse=lambda r: msgspec.json.decode(r.content),
            )
        )


def _file_props(resp: httpx2.Response) -> dict[str, Any]:
    return {
        "size": int(resp.headers["ocp-content-length"]),
        "lastModified": resp.headers["last-modified"],
    }


def _range(byte_range: tuple[int, int] | None) -> dict[str, str] | None:
    return {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else None


# --------------------------------------------------------------------------- conveniences


def chunks(items: Sequence[m.TaskAdd], size: int = 100) -> Iterable[list[m.TaskAdd]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def add_many(
    client: Client, workitem: str, job: str, tasks: Sequence[m.TaskAdd]
) -> list[m.TaskAddResult]:
    """Add any number of tasks, 100 per request."""
    out: list[m.TaskAddResult] = []
    for part in chunks(tasks):
        out.extend(client.tasks.add_collection(workitem, job, part))
    return out


async def add_many_async(
    client: AsyncClient, workitem: str, job: str, tasks: Sequence[m.TaskAdd]
) -> list[m.TaskAddResult]:
    out: list[m.TaskAddResult] = []
    for part in chunks(tasks):
        out.extend(await client.tasks.add_collection(workitem, job, part))
    return out


def _all_waiting(active: Sequence[m.Task]) -> bool:
    return all(t.dependency_state for t in active)


# A job with failures whose other tasks wait: looked at no more often than this (it lists them).
BLOCKED_CHECK_S = 2.0


def wait_for_tasks(
    client: Client,
    workitem: str,
    job: str,
    *,
    timeout: float | None = None,
    poll: float = 0.25,
    progress: Callable[[m.TaskCounts], None] | None = None,
) -> m.TaskCounts:
    """Block until every task of the job is completed, or until nothing can run any more: nothing
    running, a task failed, and every active task waits for dependencies (blocked by the failure;
    the returned counts then show them as active). `progress` gets the counts on each poll."""
    deadline = None if timeout is None else time.monotonic() + timeout
    checked = 0.0
    while True:
        counts = client.jobs.task_counts(workitem, job)
        if progress:
            progress(counts)
        if counts.active == 0 and counts.running == 0:
            return counts
        if counts.running == 0 and counts.failed and time.monotonic() - checked > BLOCKED_CHECK_S:
            checked = time.monotonic()
            # The second count proves nothing moved while the list was read.
            if _all_waiting(client.tasks.list(workitem, job, state="active")) and (
                client.jobs.task_counts(workitem, job) == counts
            ):
                return counts
        if deadline is not None and time.monotonic() > deadline:
            raise BatchError(
                0,
                "WaitTimedOut",
                f"tasks still unfinished after {timeout} s: "
                f"{counts.active} active, {counts.running} running",
            )
        time.sleep(poll)


async def wait_for_tasks_async(
    client: AsyncClient,
    workitem: str,
    job: str,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 (mirrors the sync API)
    poll: float = 0.25,
    progress: Callable[[m.TaskCounts], None] | None = None,
) -> m.TaskCounts:
    import anyio

    deadline = None if timeout is None else time.monotonic() + timeout
    checked = 0.0
    while True:
        counts = await client.jobs.task_counts(workitem, job)
        if progress:
            progress(counts)
        if counts.active == 0 and counts.running == 0:
            return counts
        if counts.running == 0 and counts.failed and time.monotonic() - checked > BLOCKED_CHECK_S:
            checked = time.monotonic()
            if _all_waiting(await client.tasks.list(workitem, job, state="active")) and (
                await client.jobs.task_counts(workitem, job) == counts
            ):
                return counts
        if deadline is not None and time.monotonic() > deadline:
            raise BatchError(0, "WaitTimedOut", f"tasks still unfinished after {timeout} s")
        await anyio.sleep(poll)


# --------------------------------------------------------------------------- issue 8
