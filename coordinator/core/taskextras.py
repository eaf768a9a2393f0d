"""A task's output files and required slots: their checks at add time and their agent form.

Kept apart from tasks.py, which calls `apply` once per added task that carries either.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from coordinator.common import models as m
from coordinator.common.errors import bad_request
from protocol import messages as pm
from protocol.paths import validate_relative_path

from .records import Job, TaskRec
from .store import Store

MAX_OUTPUT_FILES = 100
CONDITIONS = ("tasksuccess", "taskfailure", "taskcompletion")


def check_output_files(files: list[m.OutputFile], field: str = "outputFiles") -> None:
    if len(files) > MAX_OUTPUT_FILES:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} holds at most {MAX_OUTPUT_FILES} entries, got {len(files)}",
            field=field,
        )
    for i, f in enumerate(files):
        where = f"{field}[{i}]"
        pattern = f.file_pattern
        try:
            # One leading ../ reaches the task directory (stdout.txt, stderr.txt), as in Azure.
            validate_relative_path(pattern[3:] if pattern.startswith("../") else pattern)
        except ValueError as exc:
            raise bad_request(
                "InvalidPropertyValue", f"{where}.filePattern: {exc}", field=f"{where}.filePattern"
            ) from None
        cond = f.upload_options.upload_condition.lower()
        if cond not in CONDITIONS:
            raise bad_request(
                "InvalidPropertyValue",
                f"{where}.uploadOptions.uploadCondition must be one of {', '.join(CONDITIONS)},"
                f" not {f.upload_options.upload_condition!r}",
                field=f"{where}.uploadOptions.uploadCondition",
            )
        d = f.destination
        if (d.container is None) == (d.file_store is None):
            raise bad_request(
                "InvalidPropertyValue",
                f"{where}.destination needs exactly one of container and fileStore",
                field=f"{where}.destination",
            )
        path = d.container.path if d.container is not None else d.file_store.path  # type: ignore[union-attr]
        if path:
            try:
                validate_relative_path(path)
            except ValueError as exc:
                raise bad_request(
                    "InvalidPropertyValue",
                    f"{where}.destination path: {exc}",
                    field=f"{where}.destination",
                ) from None
        if d.container is not None:
            u = urlsplit(d.container.container_url)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise bad_request(
                    "InvalidPropertyValue",
                    f"{where}.destination.container.containerUrl must be an http(s) URL",
                    field=f"{where}.destination.container.containerUrl",
                )


def check_slots(store: Store, job: Job, slots: int, field: str = "requiredSlots") -> None:
    """1 ≤ slots ≤ the slots of the job's pool's TVMs: a larger task could never run."""
    if slots < 1:
        raise bad_request("InvalidPropertyValue", f"{field} must be at least 1", field=field)
    pool = store.pools.get(job.rec.pool)
    per_tvm = pool.spec.max_tasks_per_vm if pool is not None else None
    if per_tvm is not None and slots > per_tvm:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} is {slots} but every TVM of pool {job.rec.pool!r} has {per_tvm}"
            f" task slot{'s' if per_tvm != 1 else ''} (taskSlotsPerNode, maxTasksPerVM):"
            " the task could never run",
            field=field,
            requiredSlots=slots,
            taskSlotsPerNode=per_tvm,
        )


def apply(store: Store, job: Job, task: TaskRec, req: m.TaskAdd) -> None:
    """Check and record a new task's output files and slots (raises before anything is stored)."""
    if req.output_files:
        check_output_files(req.output_files)
        task.output_files = list(req.output_files)
    if req.required_slots != 1:
        check_slots(store, job, req.required_slots)
        task.slots = req.required_slots
        job.wide = True


def output_specs(files: list[m.OutputFile]) -> list[pm.OutputFileSpec]:
    out = []
    for f in files:
        c = f.destination.container
        fs = f.destination.file_store
        out.append(
            pm.OutputFileSpec(
                pattern=f.file_pattern,
                condition=f.upload_options.upload_condition.lower(),
                container_url=c.container_url if c is not None else "",
                path=(c.path if c is not None else fs.path if fs is not None else "") or "",
            )
        )
    return out
