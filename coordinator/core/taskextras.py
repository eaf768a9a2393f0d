"""A task's output files and required slots: their checks at add time and their agent form.

Kept apart from tasks.py, which calls `apply` once per added task that carries either.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from coordinator.common import models as m
from coordinator.common.errors import bad_request
from protocol import messages as pm
from protocol.paths import validate_relative_path

from .multi import MAX_INSTANCES
from .records import Job, TaskRec
from .specs import check_files
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


def check_multi(
    store: Store,
    job: Job,
    mi: m.MultiInstanceSettings,
    slots: int,
    field: str = "multiInstanceSettings",
) -> None:
    """As in Azure: on a pool with inter-TVM communication and one task slot per TVM."""
    n = mi.number_of_instances
    if not 1 <= n <= MAX_INSTANCES:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field}.numberOfInstances must be between 1 and {MAX_INSTANCES}, not {n}",
            field=f"{field}.numberOfInstances",
        )
    if not (mi.coordination_command_line or "").strip():
        raise bad_request(
            "MissingRequiredProperty",
            f"{field}.coordinationCommandLine is required (it runs on every instance's TVM)",
            field=f"{field}.coordinationCommandLine",
        )
    if mi.common_resource_files:
        check_files(mi.common_resource_files, f"{field}.commonResourceFiles")
    if slots != 1:
        raise bad_request(
            "InvalidPropertyValue",
            "a multi-instance task takes one whole TVM per instance: requiredSlots must be 1",
            field="requiredSlots",
        )
    pool = store.pools.get(job.rec.pool)
    if pool is not None and (not pool.spec.communication or pool.spec.max_tasks_per_vm != 1):
        raise bad_request(
            "InvalidPropertyValue",
            f"multi-instance tasks need a pool with inter-TVM communication"
            f" (enableInterNodeCommunication, communication) and one task slot per TVM;"
            f" pool {job.rec.pool!r} has communication {str(pool.spec.communication).lower()}"
            f" and {pool.spec.max_tasks_per_vm} slot(s) per TVM",
            field=field,
        )


def apply(store: Store, job: Job, task: TaskRec, req: m.TaskAdd) -> None:
    """Check a new task's output files, slots and multi-instance settings, then record them: a
    refusal changes nothing (the job's placement mode included)."""
    if req.output_files:
        check_output_files(req.output_files)
    if req.required_slots != 1:
        check_slots(store, job, req.required_slots)
    if req.multi_instance_settings is not None:
        check_multi(store, job, req.multi_instance_settings, req.required_slots)
    task.output_files = list(req.output_files) or None
    task.slots = req.required_slots
    task.multi = req.multi_instance_settings
    if task.slots != 1 or task.multi is not None:
        job.wide = True  # placed by slotplace.py from now on


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
