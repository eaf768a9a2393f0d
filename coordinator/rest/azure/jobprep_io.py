"""Azure `jobPreparationTask` / `jobReleaseTask` <-> the core's models (read leniently), and the
per-node status view of `/jobs/{job}/jobpreparationandreleasetaskstatus` (pure)."""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m
from coordinator.common.timeutil import UNLIMITED, rfc3339
from coordinator.core.records import JobPrepRec, PrepRun

from .body import Body
from .ids import node_path_out
from .inputs import constraints, env_settings, resource_files, user_elevated

# What a special task has on Azure and a process here cannot honour (a clear 400, never silence).
_REFUSED = ("containerSettings", "applicationPackageReferences", "outputFiles")
_WHY = "TVM Batch runs Linux tasks as sandboxed processes on its own machines"


def _user(b: Body) -> bool:
    return user_elevated(b.obj("userIdentity"), b._p("userIdentity"))


def prep_task(b: Body | None) -> m.JobPreparationTask | None:
    if b is None:
        return None
    b.refuse(_REFUSED, _WHY)
    return m.JobPreparationTask(
        name=b.text("id") or "jobpreparation",
        command_line=b.req_text("commandLine"),
        resource_files=resource_files(b.objs("resourceFiles")),
        environment_settings=env_settings(b.objs("environmentSettings")),
        task_constraints=constraints(b.obj("constraints")),
        wait_for_success=b.flag("waitForSuccess", True),
        rerun_on_tvm_reboot_after_success=b.flag("rerunOnNodeRebootAfterSuccess", True),
        run_elevated=_user(b),
    )


def release_task(b: Body | None) -> m.JobReleaseTask | None:
    if b is None:
        return None
    b.refuse(_REFUSED, _WHY)
    return m.JobReleaseTask(
        name=b.text("id") or "jobrelease",
        command_line=b.req_text("commandLine"),
        resource_files=resource_files(b.objs("resourceFiles")),
        environment_settings=env_settings(b.objs("environmentSettings")),
        max_wall_clock_time=b.text("maxWallClockTime"),
        retention_time=b.text("retentionTime"),
        run_elevated=_user(b),
    )


def _user_identity(elevated: bool) -> dict[str, Any]:
    level = "admin" if elevated else "nonadmin"
    return {"autoUser": {"scope": "pool", "elevationLevel": level}}


def _env_out(items: list[m.EnvironmentSetting]) -> list[dict[str, str]]:
    return [{"name": e.name, "value": e.value} for e in items]


def _files_out(items: list[m.ResourceFile]) -> list[dict[str, str]]:
    return [{"httpUrl": f.blob_source, "filePath": f.file_path} for f in items]


def prep_view(p: m.JobPreparationTask | None) -> dict[str, Any] | None:
    if p is None:
        return None
    c = p.task_constraints or m.TaskConstraints()
    return {
        "id": p.name,
        "commandLine": p.command_line,
        "resourceFiles": _files_out(p.resource_files),
        "environmentSettings": _env_out(p.environment_settings),
        "constraints": {
            "maxWallClockTime": c.max_wall_clock_time or UNLIMITED,
            "retentionTime": c.retention_time or "P7D",
            "maxTaskRetryCount": c.max_task_retry_count or 0,
        },
        "waitForSuccess": p.wait_for_success,
        "userIdentity": _user_identity(p.run_elevated),
        "rerunOnNodeRebootAfterSuccess": p.rerun_on_tvm_reboot_after_success,
    }


def release_view(r: m.JobReleaseTask | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "id": r.name,
        "commandLine": r.command_line,
        "resourceFiles": _files_out(r.resource_files),
        "environmentSettings": _env_out(r.environment_settings),
        "maxWallClockTime": r.max_wall_clock_time or "PT15M",
        "retentionTime": r.retention_time or "P7D",
        "userIdentity": _user_identity(r.run_elevated),
    }


def _run_view(
    run: PrepRun | None, task_dir: str, node_url: str, retries: bool
) -> dict[str, Any] | None:
    if run is None:
        return None
    done = run.state == "completed"
    failure = None
    if run.failure is not None:
        category, code, message = run.failure
        failure = {"category": category.lower(), "code": code, "message": message}
    elif done and run.exit_code not in (0, None):
        failure = {
            "category": "usererror",
            "code": "FailureExitCode",
            "message": f"The task exited with an exit code representing a failure ({run.exit_code})",
        }
    view: dict[str, Any] = {
        # `pending` (a lost run that will run again) is not an Azure state: it is running again.
        "state": "completed" if done else "running",
        "startTime": rfc3339(run.start_time),
        "endTime": rfc3339(run.end_time) if done else None,
        "taskRootDirectory": task_dir,
        "taskRootDirectoryUrl": f"{node_url}/files/{task_dir}",
        "exitCode": run.exit_code if done else None,
        "failureInfo": failure,
        "result": ("success" if run.succeeded else "failure") if done else None,
    }
    if retries:
        view["retryCount"] = run.retry_count
        view["lastRetryTime"] = rfc3339(run.last_retry)
    return {k: v for k, v in view.items() if v is not None}


def status_view(base: str, rec: JobPrepRec) -> dict[str, Any]:
    """One node's entry (Azure's `BatchJobPreparationAndReleaseTaskStatus`)."""
    node_url = f"{base}/pools/{rec.pool}/nodes/{rec.tvm}"
    root = f"tasks/{rec.job}"
    view: dict[str, Any] = {
        "poolId": rec.pool,
        "nodeId": rec.tvm,
        "nodeUrl": node_url,
        "jobPreparationTaskExecutionInfo": _run_view(
            rec.prep, node_path_out(f"{root}/{rec.prep_name}"), node_url, True
        ),
        "jobReleaseTaskExecutionInfo": _run_view(
            rec.release, node_path_out(f"{root}/{rec.release_name}"), node_url, False
        ),
    }
    return {k: v for k, v in view.items() if v is not None}
