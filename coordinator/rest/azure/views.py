"""Records -> Azure Batch resources (plain dicts, 2025-06-01 property names; pure)."""

from __future__ import annotations

from typing import Any

import msgspec

from coordinator.common import models as m
from coordinator.common.timeutil import UNLIMITED, format_duration, rfc3339
from coordinator.core import CoordinatorState
from coordinator.core.deps import status as dependency_status
from coordinator.core.multi import Sub
from coordinator.core.records import ACTIVE, COMPLETED, Job, PoolRec, TaskRec, Tvm

from .conv import etag_of
from .ids import job_id, node_path_out
from .jobprep_io import prep_view, release_view
from .outputs import output_files_view
from .sizes import azure_vm_size


def _t(ts: float | None) -> str | None:
    return rfc3339(ts)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _env(items: list[m.EnvironmentSetting] | dict[str, str] | None) -> list[dict[str, str]]:
    if not items:
        return []
    if isinstance(items, dict):
        return [{"name": k, "value": v} for k, v in items.items()]
    return [{"name": e.name, "value": e.value} for e in items]


def _files(items: list[m.ResourceFile] | None) -> list[dict[str, str]]:
    return [{"httpUrl": f.blob_source, "filePath": f.file_path} for f in items or []]


def _user(elevated: bool) -> dict[str, Any]:
    level = "admin" if elevated else "nonadmin"
    return {"autoUser": {"scope": "pool", "elevationLevel": level}}


def _start_task(st: m.StartTask | None) -> dict[str, Any] | None:
    if st is None:
        return None
    return {
        "commandLine": st.command_line,
        "resourceFiles": _files(st.resource_files),
        "environmentSettings": _env(st.environment_settings),
        "userIdentity": _user(st.run_elevated),
        "maxTaskRetryCount": st.max_task_retry_count,
        "waitForSuccess": st.wait_for_success,
    }


def _finish(view: dict[str, Any], modified: float) -> dict[str, Any]:
    """Add `eTag` and `lastModified` (from the resource's own properties)."""
    view = _clean(view)
    view["eTag"] = etag_of(view)
    view["lastModified"] = _t(modified)
    return view


def pool_modified(pool: PoolRec) -> float:
    return max(pool.created, pool.state_time)


def pool_view(core: CoordinatorState, base: str, pool: PoolRec) -> dict[str, Any]:
    s = pool.spec
    az = s.azure or {}
    current = sum(
        1
        for t in core.tvms.values()
        if t.rec.pool == s.name and t.rec.pending_op not in ("leave", "leaving")
    )
    low = int(az.get("targetLowPriorityNodes", 0) or 0)
    errors: list[dict[str, Any]] = []
    if pool.resize_error:
        errors.append({"code": pool.resize_error[0], "message": pool.resize_error[1], "values": []})
    if low:
        errors.append(
            {
                "code": "AccountLowPriorityCoreQuotaReached",
                "message": f"targetLowPriorityNodes {low} is accepted but never fulfilled: "
                "TVM Batch has no Spot or low-priority nodes",
                "values": [{"name": "targetLowPriorityNodes", "value": str(low)}],
            }
        )
    view = {
        "id": s.name,
        "displayName": az.get("displayName"),
        "url": f"{base}/pools/{s.name}",
        "creationTime": _t(pool.created),
        "state": pool.state,
        "stateTransitionTime": _t(pool.state_time),
        "allocationState": pool.alloc_state,
        "allocationStateTransitionTime": _t(pool.alloc_time),
        "vmSize": az.get("vmSize") or azure_vm_size(s.vm_size, core.vm_sizes()),
        "virtualMachineConfiguration": az.get("virtualMachineConfiguration"),
        "resizeTimeout": format_duration(pool.resize_timeout_s),
        "resizeErrors": errors or None,
        "currentDedicatedNodes": current,
        "currentLowPriorityNodes": 0,
        "targetDedicatedNodes": pool.target,
        "targetLowPriorityNodes": low,
        "enableAutoScale": s.enable_auto_scale,
        "autoScaleFormula": s.auto_scale_formula,
        "autoScaleEvaluationInterval": s.auto_scale_evaluation_interval,
        "enableInterNodeCommunication": s.communication,
        "startTask": _start_task(s.start_task),
        "certificateReferences": [
            {"thumbprint": c.thumbprint, "thumbprintAlgorithm": c.thumbprint_algorithm}
            for c in s.certificate_references
        ]
        or None,
        "taskSlotsPerNode": s.max_tasks_per_vm,
        "taskSchedulingPolicy": {"nodeFillType": s.tvm_fill_type},
        "metadata": [{"name": x.name, "value": x.value} for x in s.metadata],
    }
    if pool.auto_scale_run is not None:
        ts, results, code, message = pool.auto_scale_run
        run: dict[str, Any] = {"timestamp": _t(ts), "results": results}
        if code:
            run["error"] = {"code": code, "message": message or ""}
        view["autoScaleRun"] = run
    return _finish(view, pool_modified(pool))


def node_view(core: CoordinatorState, base: str, tvm: Tvm) -> dict[str, Any]:
    r = tvm.rec
    pool = core.pools.get(r.pool)
    st_info = None
    if r.start_task:
        d = r.start_task
        failure = d.get("failure")
        exit_code = d.get("exit_code")
        st_info = _clean(
            {
                "state": str(d.get("state", "running")),
                "startTime": _t(d.get("start_time")),  # type: ignore[arg-type]
                "endTime": _t(d.get("end_time")),  # type: ignore[arg-type]
                "exitCode": exit_code,
                "retryCount": int(d.get("retry_count", 0) or 0),  # type: ignore[call-overload]
                "failureInfo": _failure(failure) if failure else None,  # type: ignore[arg-type]
                "result": None
                if d.get("state") != "completed"
                else ("success" if exit_code == 0 and not failure else "failure"),
            }
        )
    recent = []
    for key, task in list(tvm.running.items())[:20]:
        wi, job, _ = key.split("/")
        name = task.name  # a multi-instance task's instance is listed as its task
        jid = job_id(core, wi, job)
        recent.append(
            {
                "taskUrl": f"{base}/jobs/{jid}/tasks/{name}",
                "jobId": jid,
                "taskId": name,
                "taskState": task.state,
            }
        )
    size = pool.spec.azure.get("vmSize") if pool and pool.spec.azure else None
    view = {
        "id": r.name,
        "url": f"{base}/pools/{r.pool}/nodes/{r.name}",
        "state": r.state,
        "schedulingState": r.scheduling,
        "stateTransitionTime": _t(r.state_time),
        "lastBootTime": _t(max(r.created, r.booted)),
        "allocationTime": _t(r.created),
        "ipAddress": r.ip,
        "affinityId": f"TVM:{r.name}",
        "vmSize": size or (azure_vm_size(pool.spec.vm_size, core.vm_sizes()) if pool else ""),
        "totalTasksRun": r.total_run,
        "runningTasksCount": len(tvm.running),
        "runningTaskSlotsCount": tvm.slots - max(tvm.free, 0),  # queued tasks take none
        "totalTasksSucceeded": r.total_succeeded,
        "recentTasks": recent,
        "startTask": _start_task(pool.spec.start_task) if pool else None,
        "startTaskInfo": st_info,
        "errors": [{"code": "CertificateInstallationFailed", "message": e} for e in r.cert_errors]
        or None,
        "isDedicated": True,
        "nodeAgentInfo": {"version": "tvmagent", "lastUpdateTime": _t(r.created)},
        "virtualMachineInfo": {
            "imageReference": (pool.spec.azure or {})
            .get("virtualMachineConfiguration", {})
            .get("imageReference")
        }
        if pool and pool.spec.azure
        else None,
    }
    return _clean(view)


def _failure(f: tuple[str, str, str] | list[str]) -> dict[str, Any]:
    category, code, message = f
    cat = "usererror" if category.lower().startswith("user") else "servererror"
    return {"category": cat, "code": code, "message": message, "details": []}


def _exit_failure(t: TaskRec) -> dict[str, Any] | None:
    """A completed task that exited non-zero failed with Azure's UserError FailureExitCode."""
    if t.state != COMPLETED or t.exit_code in (None, 0):
        return None
    return {
        "category": "usererror",
        "code": "FailureExitCode",
        "message": f"The task process exited with an unexpected exit code ({t.exit_code})",
        "details": [{"name": "Message", "value": f"The task exited with exit code {t.exit_code}"}],
    }


def job_state(job: Job) -> str:
    return job.rec.state


def job_view(core: CoordinatorState, base: str, job: Job) -> dict[str, Any]:
    r = job.rec
    wi = core.workitems.get(r.workitem)
    az = (wi.spec.azure if wi else None) or {}
    jid = job_id(core, r.workitem, r.name)
    jm = wi.spec.job_manager if wi else None
    # A job schedule's jobs take their display name and metadata from its jobSpecification.
    scheduled = wi is not None and wi.spec.schedule is not None
    view = {
        "id": jid,
        "displayName": az.get("jobDisplayName" if scheduled else "displayName"),
        "url": f"{base}/jobs/{jid}",
        "creationTime": _t(r.created),
        "state": r.state,
        "stateTransitionTime": _t(r.state_time),
        "previousState": r.prev_state,
        "priority": r.priority,
        "maxParallelTasks": r.max_parallel,
        "allowTaskPreemption": False,
        "usesTaskDependencies": r.uses_deps,
        "constraints": {
            "maxWallClockTime": format_duration(r.max_wall_s)
            if r.max_wall_s is not None
            else UNLIMITED,
            "maxTaskRetryCount": r.max_retries,
        },
        "jobManagerTask": _jm(jm) if jm else None,
        "jobPreparationTask": prep_view(r.prep),
        "jobReleaseTask": release_view(r.release),
        "commonEnvironmentSettings": _env(r.common_env),
        # an auto pool's job shows the specification it was made from; executionInfo the pool
        "poolInfo": {"autoPoolSpecification": az["autoPoolSpecification"]}
        if "autoPoolSpecification" in az
        else {"poolId": r.pool},
        "onAllTasksComplete": r.on_all_complete,
        "onTaskFailure": r.on_task_failure,
        "metadata": az["jobMetadata"]
        if scheduled and "jobMetadata" in az
        else [{"name": x.name, "value": x.value} for x in (wi.spec.metadata if wi else [])],
        "executionInfo": _clean(
            {
                "startTime": _t(r.created),
                "endTime": _t(r.end_time),
                "poolId": r.pool,
                "terminateReason": r.terminate_reason,
            }
        ),
    }
    return _finish(view, max(r.created, r.state_time))


def _jm(jm: m.JobManager) -> dict[str, Any]:
    tc = jm.task_constraints
    return _clean(
        {
            "id": jm.name,
            "commandLine": jm.command_line,
            "resourceFiles": _files(jm.resource_files),
            "environmentSettings": _env(jm.environment_settings),
            "constraints": _clean(
                {
                    "maxWallClockTime": tc.max_wall_clock_time,
                    "maxTaskRetryCount": tc.max_task_retry_count,
                    "retentionTime": tc.retention_time,
                }
            )
            if tc
            else None,
            "killJobOnCompletion": jm.kill_job_on_completion,
            "userIdentity": _user(jm.run_elevated),
            "runExclusive": jm.run_exclusive,
            "requiredSlots": 1,
            # Every job manager gets its job-scoped token (AZ_BATCH_AUTHENTICATION_TOKEN).
            "authenticationTokenSettings": {"access": ["job"]},
        }
    )


def task_result(t: TaskRec) -> str | None:
    if t.state != COMPLETED:
        return None
    return "success" if t.exit_code == 0 and t.failure is None else "failure"


def _multi(mi: m.MultiInstanceSettings | None) -> dict[str, Any] | None:
    if mi is None:
        return None
    return _clean(
        {
            "numberOfInstances": mi.number_of_instances,
            "coordinationCommandLine": mi.coordination_command_line,
            "commonResourceFiles": _files(mi.common_resource_files) or None,
        }
    )


def task_view(core: CoordinatorState, base: str, job: Job, t: TaskRec) -> dict[str, Any]:
    jid = job_id(core, job.rec.workitem, job.rec.name)
    wall = t.max_wall_s if t.max_wall_s is not None else job.rec.max_wall_s
    retries = t.max_retries if t.max_retries is not None else job.rec.max_retries
    started = t.state != ACTIVE or t.retry_count or t.requeue_count
    info = _clean(
        {
            "startTime": _t(t.start_time) if started else None,
            "endTime": _t(t.end_time) if t.state == COMPLETED else None,
            "exitCode": t.exit_code if t.state == COMPLETED or t.retry_count else None,
            "failureInfo": _failure(t.failure) if t.failure else _exit_failure(t),
            "retryCount": t.retry_count,
            "lastRetryTime": _t(t.last_retry),
            "requeueCount": t.requeue_count,
            "lastRequeueTime": _t(t.last_requeue),
            "result": task_result(t),
        }
    )
    node_info = None
    if t.tvm:
        tvm = core.tvms.get(t.tvm)
        pool = t.pool or (tvm.rec.pool if tvm else "")
        task_dir = node_path_out(f"tasks/{job.rec.workitem}/{job.rec.name}/{t.name}")
        node_url = f"{base}/pools/{pool}/nodes/{t.tvm}"
        node_info = {
            "affinityId": f"TVM:{t.tvm}",
            "nodeUrl": node_url,
            "poolId": pool,
            "nodeId": t.tvm,
            "taskRootDirectory": task_dir,
            "taskRootDirectoryUrl": f"{node_url}/files/{task_dir}",
        }
    view = {
        "id": t.name,
        "displayName": t.name,
        "url": f"{base}/jobs/{jid}/tasks/{t.name}",
        "creationTime": _t(t.created),
        "state": t.state,
        "stateTransitionTime": _t(t.state_time),
        "previousState": t.prev_state,
        "previousStateTransitionTime": None,
        "commandLine": t.command_line,
        "resourceFiles": _files(t.resource_files),
        "environmentSettings": _env(t.env),
        "affinityInfo": {"affinityId": f"TVM:{t.affinity}"} if t.affinity else None,
        "constraints": {
            "maxWallClockTime": format_duration(wall) if wall is not None else UNLIMITED,
            "retentionTime": format_duration(t.retention_s) if t.retention_s is not None else "P7D",
            "maxTaskRetryCount": retries,
        },
        "requiredSlots": t.slots,
        "outputFiles": output_files_view(t.output_files),
        "multiInstanceSettings": _multi(t.multi),
        "userIdentity": _user(t.run_elevated),
        "executionInfo": info,
        "nodeInfo": node_info,
        "dependsOn": msgspec.to_builtins(t.depends_on) if t.depends_on else None,
        "exitConditions": msgspec.to_builtins(t.exit_conditions) if t.exit_conditions else None,
    }
    dep = dependency_status(job, t) if job.deps is not None else None
    if dep is not None:
        # Not an Azure property (clients keep it as an extra one): why an active task waits.
        view["dependencyState"], view["dependencyReason"] = dep
    return _finish(view, max(t.created, t.state_time))


def subtasks_view(base: str, job: Job, t: TaskRec, subs: list[Sub]) -> list[dict[str, Any]]:
    """Azure's subtasks of a multi-instance task: the instances beside the primary (1..N-1)."""
    out = []
    for i, s in enumerate(subs):
        if i == 0:
            continue
        task_dir = node_path_out(f"tasks/{job.rec.workitem}/{job.rec.name}/{t.name}~{i}")
        node_url = f"{base}/pools/{t.pool}/nodes/{s.tvm}"
        ok = s.exit_code == 0 and s.failure is None
        out.append(
            _clean(
                {
                    "id": i,
                    "nodeInfo": {
                        "affinityId": f"TVM:{s.tvm}",
                        "nodeUrl": node_url,
                        "poolId": t.pool,
                        "nodeId": s.tvm,
                        "taskRootDirectory": task_dir,
                        "taskRootDirectoryUrl": f"{node_url}/files/{task_dir}",
                    },
                    "startTime": _t(s.start_time),
                    "endTime": _t(s.end_time),
                    "exitCode": s.exit_code,
                    "failureInfo": _failure(s.failure) if s.failure else None,
                    "state": s.state,
                    "stateTransitionTime": _t(s.end_time or s.start_time),
                    "result": None if s.state != "completed" else ("success" if ok else "failure"),
                }
            )
        )
    return out
