"""Azure request bodies -> the core's commands (the seed's models), read leniently.

Names map one to one (`id` -> `name`, `targetDedicatedNodes` -> `targetDedicated`, `taskSlotsPerNode`
-> `maxTasksPerVM`, `userIdentity.autoUser.elevationLevel: admin` -> `runElevated`, ...). What the
Azure resource has and the core does not (displayName, the image reference, the Azure VM size name,
a low-priority target) is kept in the spec's `azure` dict and echoed back. Settings this service
cannot honour are refused with 400 `InvalidPropertyValue` naming the property.
"""

from __future__ import annotations

from typing import Any

import msgspec

from coordinator.common import models as m
from coordinator.common import vmsizes
from coordinator.core.specs import check_max_parallel

from .body import Body
from .conv import invalid
from .outputs import read_output_files
from .sizes import local_vm_size

# An auto pool's lifetime in Azure's words -> the seed's.
_LIFETIMES = {"jobschedule": "workitem", "job": "job"}

# Pool settings that need Azure infrastructure (or Windows): a clear 400, never silence.
_POOL_REFUSED = (
    "cloudServiceConfiguration",
    "networkConfiguration",
    "mountConfiguration",
    "userAccounts",
    "applicationPackageReferences",
    "applicationLicenses",
    "identity",
)
_VMC_REFUSED = (
    "windowsConfiguration",
    "diskEncryptionConfiguration",
    "extensions",
    "dataDisks",
    "containerConfiguration",
    "securityProfile",
    "osDisk",
    "nodePlacementConfiguration",
    "licenseType",
    "serviceArtifactReference",
)
_TASK_REFUSED = (
    "containerSettings",
    "applicationPackageReferences",
    "authenticationTokenSettings",
)
WHY_LOCAL = "TVM Batch runs Linux tasks as sandboxed processes on its own machines"


def user_elevated(b: Body | None, prop: str) -> bool:
    if b is None:
        return False
    if b.has("username"):
        raise invalid(
            f"{prop}.username",
            b.text("username"),
            "named user accounts are not supported; use autoUser",
        )
    auto = b.obj("autoUser")
    if auto is None:
        return False
    auto.accept("scope")
    level = (auto.text("elevationLevel") or "nonadmin").lower()
    if level not in ("admin", "nonadmin"):
        raise invalid(
            f"{prop}.autoUser.elevationLevel", level, "elevationLevel must be admin or nonadmin"
        )
    return level == "admin"


def resource_files(items: list[Body]) -> list[m.ResourceFile]:
    out = []
    for rf in items:
        rf.refuse(
            ("autoStorageContainerName", "storageContainerUrl", "identityReference"),
            "only httpUrl (http, https or filestore:) resource files are supported",
        )
        rf.accept("fileMode", "blobPrefix")
        url = rf.req_text("httpUrl")
        path = rf.req_text("filePath")
        out.append(m.ResourceFile(blob_source=url, file_path=path))
    return out


def env_settings(items: list[Body]) -> list[m.EnvironmentSetting]:
    return [
        m.EnvironmentSetting(name=e.req_text("name"), value=e.text("value") or "") for e in items
    ]


def metadata(items: list[Body]) -> list[m.MetadataItem]:
    return [m.MetadataItem(name=e.req_text("name"), value=e.text("value") or "") for e in items]


def start_task(b: Body | None) -> m.StartTask | None:
    if b is None:
        return None
    b.refuse(("containerSettings",), WHY_LOCAL)
    return m.StartTask(
        command_line=b.req_text("commandLine"),
        resource_files=resource_files(b.objs("resourceFiles")),
        environment_settings=env_settings(b.objs("environmentSettings")),
        max_task_retry_count=b.integer("maxTaskRetryCount", 0) or 0,
        wait_for_success=b.flag("waitForSuccess", True),
        run_elevated=user_elevated(b.obj("userIdentity"), b._p("userIdentity")),
    )


def cert_refs(items: list[Body]) -> list[m.CertificateReference]:
    out = []
    for c in items:
        c.accept("storeLocation", "storeName", "visibility")
        out.append(
            m.CertificateReference(
                thumbprint=c.req_text("thumbprint"),
                thumbprint_algorithm=c.text("thumbprintAlgorithm") or "sha1",
            )
        )
    return out


def vm_configuration(b: Body) -> dict[str, Any]:
    vmc = b.obj("virtualMachineConfiguration")
    if vmc is None:
        if b.has("cloudServiceConfiguration"):
            b.refuse(
                ("cloudServiceConfiguration",), "cloud service pools are retired; " + WHY_LOCAL
            )
        raise invalid(
            "virtualMachineConfiguration", None, "virtualMachineConfiguration is required"
        )
    vmc.refuse(_VMC_REFUSED, WHY_LOCAL)
    image = vmc.obj("imageReference")
    sku = vmc.text("nodeAgentSKUId")
    vmsizes.check_image(image.data if image else None, sku)
    assert image is not None
    assert sku is not None
    image.accept(*image.data)
    return {"imageReference": image.kept(), "nodeAgentSKUId": sku}


def pool_add(b: Body, catalogue: dict[str, tuple[int, int, int, str]]) -> m.PoolAdd:
    pool_id = b.req_text("id")
    b.refuse(_POOL_REFUSED, WHY_LOCAL)
    vm_size = b.req_text("vmSize")
    vmc = vm_configuration(b)
    local = local_vm_size(vm_size, catalogue, b._p("vmSize"))
    target = b.integer("targetDedicatedNodes", 0) or 0
    low = b.integer("targetLowPriorityNodes", 0) or 0
    if low < 0:
        raise invalid("targetLowPriorityNodes", low, "targetLowPriorityNodes must not be negative")
    auto = b.flag("enableAutoScale", False)
    if auto and (b.has("targetDedicatedNodes") or b.has("targetLowPriorityNodes")):
        raise invalid(
            "targetDedicatedNodes",
            target,
            "targetDedicatedNodes and targetLowPriorityNodes must be absent when enableAutoScale is true",
        )
    policy = b.obj("taskSchedulingPolicy")
    fill = "spread"
    if policy is not None:
        policy.accept("jobDefaultOrder")
        fill = (policy.text("nodeFillType") or "spread").lower()
    b.accept("upgradePolicy", "resourceTags", "targetNodeCommunicationMode")
    azure = {
        "displayName": b.text("displayName"),
        "vmSize": vm_size.lower(),
        "virtualMachineConfiguration": vmc,
        "targetLowPriorityNodes": low,
    }
    slots = b.integer("taskSlotsPerNode", 1)
    limit = 4 * int(catalogue[local][0])
    if slots is None or not 1 <= slots <= limit:
        raise invalid(
            "taskSlotsPerNode",
            slots,
            f"taskSlotsPerNode must be between 1 and {limit} (4 x the cores of vmSize {vm_size})",
        )
    return m.PoolAdd(
        name=pool_id,
        vm_size=local,
        target_dedicated=target,
        max_tasks_per_vm=slots,
        tvm_fill_type=fill,
        start_task=start_task(b.obj("startTask")),
        communication=b.flag("enableInterNodeCommunication", False),
        certificate_references=cert_refs(b.objs("certificateReferences")),
        enable_auto_scale=auto,
        auto_scale_formula=b.text("autoScaleFormula"),
        auto_scale_evaluation_interval=b.text("autoScaleEvaluationInterval"),
        resize_timeout=b.text("resizeTimeout"),
        metadata=metadata(b.objs("metadata")),
        azure={k: v for k, v in azure.items() if v is not None},
    )


def constraints(b: Body | None) -> m.TaskConstraints | None:
    if b is None:
        return None
    return m.TaskConstraints(
        max_wall_clock_time=b.text("maxWallClockTime"),
        max_task_retry_count=b.integer("maxTaskRetryCount"),
        retention_time=b.text("retentionTime"),
    )


def job_constraints(b: Body | None) -> m.JobConstraints | None:
    if b is None:
        return None
    return m.JobConstraints(
        max_wall_clock_time=b.text("maxWallClockTime"),
        max_task_retry_count=b.integer("maxTaskRetryCount"),
    )


def on_all_complete(b: Body) -> str | None:
    v = b.text("onAllTasksComplete")
    if v is None:
        return None
    v = v.lower()
    if v not in ("noaction", "terminatejob"):
        raise invalid(
            "onAllTasksComplete", v, "onAllTasksComplete must be noaction or terminatejob"
        )
    return v


def task_failure(b: Body) -> str:
    v = (b.text("onTaskFailure") or "noaction").lower()
    if v not in ("noaction", "performexitoptionsjobaction"):
        raise invalid(
            "onTaskFailure", v, "onTaskFailure must be noaction or performexitoptionsjobaction"
        )
    return v


def _exit_options(b: Body | None) -> m.ExitOptions | None:
    if b is None:
        return None
    dep = b.text("dependencyAction")
    job = b.text("jobAction")
    return m.ExitOptions(
        dependency_action=dep.lower() if dep else None, job_action=job.lower() if job else None
    )


def exit_conditions(b: Body | None) -> m.ExitConditions | None:
    if b is None:
        return None

    def req_options(c: Body) -> m.ExitOptions:
        o = _exit_options(c.obj("exitOptions"))
        if o is None:
            raise invalid(c._p("exitOptions"), None, f"{c._p('exitOptions')} is required")
        return o

    codes = []
    for c in b.objs("exitCodes"):
        code = c.integer("code")
        if code is None:
            raise invalid(c._p("code"), None, f"{c._p('code')} is required")
        codes.append(m.ExitCodeMapping(code=code, exit_options=req_options(c)))
    ranges = []
    for r in b.objs("exitCodeRanges"):
        start, end = r.integer("start"), r.integer("end")
        if start is None or end is None:
            raise invalid(r._p("start"), None, f"{r.path} needs start and end")
        ranges.append(m.ExitCodeRangeMapping(start=start, end=end, exit_options=req_options(r)))
    return m.ExitConditions(
        exit_codes=codes,
        exit_code_ranges=ranges,
        pre_processing_error=_exit_options(b.obj("preProcessingError")),
        file_upload_error=_exit_options(b.obj("fileUploadError")),
        default=_exit_options(b.obj("default")),
    )


def depends_on(b: Body | None) -> m.TaskDependencies | None:
    if b is None:
        return None
    ranges = []
    for r in b.objs("taskIdRanges"):
        start, end = r.integer("start"), r.integer("end")
        if start is None or end is None:
            raise invalid(r.path, None, f"{r.path} needs start and end")
        ranges.append(m.TaskIdRange(start=start, end=end))
    return m.TaskDependencies(task_ids=b.texts("taskIds"), task_id_ranges=ranges)


def job_manager(b: Body | None) -> m.JobManager | None:
    if b is None:
        return None
    job_token(b.obj("authenticationTokenSettings"))
    refused = tuple(k for k in _TASK_REFUSED if k != "authenticationTokenSettings")
    b.refuse(
        refused
        + ("requiredSlots", "dependsOn", "exitConditions", "outputFiles", "multiInstanceSettings"),
        WHY_LOCAL,
    )
    b.accept("displayName", "allowLowPriorityNode")
    return m.JobManager(
        name=b.req_text("id"),
        command_line=b.req_text("commandLine"),
        resource_files=resource_files(b.objs("resourceFiles")),
        environment_settings=env_settings(b.objs("environmentSettings")),
        task_constraints=constraints(b.obj("constraints")),
        kill_job_on_completion=b.flag("killJobOnCompletion", True),
        run_elevated=user_elevated(b.obj("userIdentity"), b._p("userIdentity")),
        run_exclusive=b.flag("runExclusive", True),
    )


def max_parallel(b: Body, default: int | None) -> int | None:
    """`maxParallelTasks` (the core's rule, its error naming the property's path here); `default`
    when absent."""
    value = b.integer("maxParallelTasks", default)
    check_max_parallel(value, b._p("maxParallelTasks"))
    return value


def job_token(b: Body | None) -> None:
    """A job manager always gets a token scoped to its job (AZ_BATCH_AUTHENTICATION_TOKEN): asking
    for `access: ["job"]` is accepted; no other access exists."""
    if b is None:
        return
    for i, a in enumerate(b.texts("access")):
        if a.lower() != "job":
            raise invalid(
                f"{b._p('access')}[{i}]", a, "authentication token access can only be job"
            )


def _auto_pool(
    info: Body, catalogue: dict[str, tuple[int, int, int, str]], lifetimes: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`poolInfo.autoPoolSpecification` as (the seed's autoPoolSpecification, the Azure one to
    echo). Lifetime `jobschedule` is the seed's `workitem`, `job` is `job`; `lifetimes`: those
    allowed here (a job that no schedule made has only `job`)."""
    auto = info.obj("autoPoolSpecification")
    assert auto is not None
    option = (auto.req_text("poolLifetimeOption") or "").lower()
    if option not in lifetimes:
        raise invalid(
            auto._p("poolLifetimeOption"),
            option,
            "poolLifetimeOption must be " + " or ".join(lifetimes),
        )
    prefix = auto.text("autoPoolIdPrefix") or ""
    keep = auto.flag("keepAlive", False)
    pool = auto.obj("pool")
    if pool is None:
        raise invalid(auto._p("pool"), None, f"{auto._p('pool')} is required")
    if pool.has("id"):
        raise invalid(pool._p("id"), pool.text("id"), "an auto pool's id is chosen by the service")
    # The pool specification is a pool body without its id: read it as the pool add route does.
    named = Body({**pool.data, "id": prefix or "auto"}, pool.path)
    spec = pool_add(named, catalogue)
    seed_pool = msgspec.to_builtins(spec)
    seed_pool.pop("name", None)
    seed: dict[str, Any] = {
        "poolLifetimeOption": _LIFETIMES[option],
        "keepAlive": keep,
        "pool": seed_pool,
    }
    if prefix:
        seed["autoPoolNamePrefix"] = prefix
    echo: dict[str, Any] = {"poolLifetimeOption": option, "keepAlive": keep, "pool": pool.kept()}
    if prefix:
        echo["autoPoolIdPrefix"] = prefix
    return seed, echo


def pool_info(
    info: Body,
    catalogue: dict[str, tuple[int, int, int, str]],
    lifetimes: tuple[str, ...] = ("jobschedule", "job"),
) -> tuple[m.JobExecutionEnvironment, dict[str, Any] | None]:
    """A job's `poolInfo`: a `poolId` or an `autoPoolSpecification` (not both), as the seed's
    execution environment, and the auto pool's specification to echo (None for a pool id)."""
    if not info.has("autoPoolSpecification"):
        return m.JobExecutionEnvironment(pool_name=info.req_text("poolId")), None
    if info.has("poolId"):
        raise invalid(
            info._p("poolId"), info.text("poolId"), "give poolId or autoPoolSpecification"
        )
    seed, echo = _auto_pool(info, catalogue, lifetimes)
    return m.JobExecutionEnvironment(auto_pool_specification=seed), echo


def job_add(b: Body, catalogue: dict[str, tuple[int, int, int, str]]) -> m.WorkitemAdd:
    from . import jobprep_io  # it reads its tasks with this module's helpers

    job_id = b.req_text("id")
    b.refuse(("networkConfiguration",), WHY_LOCAL)
    uses_deps = b.flag("usesTaskDependencies", False)
    on_failure = task_failure(b)
    info = b.obj("poolInfo")
    if info is None:
        raise invalid("poolInfo", None, "poolInfo is required")
    azure: dict[str, Any] = {"displayName": b.text("displayName")}
    env, echo = pool_info(info, catalogue, ("job",))
    if echo is not None:
        azure["autoPoolSpecification"] = echo
    b.accept("allowTaskPreemption")
    return m.WorkitemAdd(
        name=job_id,
        max_parallel_tasks=max_parallel(b, -1) or -1,
        job_execution_environment=env,
        priority=b.integer("priority", 0) or 0,
        job_constraints=job_constraints(b.obj("constraints")),
        job_manager=job_manager(b.obj("jobManagerTask")),
        common_environment_settings=env_settings(b.objs("commonEnvironmentSettings")),
        metadata=metadata(b.objs("metadata")),
        on_all_tasks_complete=on_all_complete(b) or "noaction",
        azure={k: v for k, v in azure.items() if v is not None},
        job_preparation_task=jobprep_io.prep_task(b.obj("jobPreparationTask")),
        job_release_task=jobprep_io.release_task(b.obj("jobReleaseTask")),
        uses_task_dependencies=uses_deps,
        on_task_failure=on_failure,
    )


def _multi(b: Body | None) -> m.MultiInstanceSettings | None:
    if b is None:
        return None
    return m.MultiInstanceSettings(
        number_of_instances=_int(b.integer("numberOfInstances", 1)),
        coordination_command_line=b.text("coordinationCommandLine"),
        common_resource_files=resource_files(b.objs("commonResourceFiles")),
    )


def _int(v: int | None) -> int:
    return 1 if v is None else v


def task_add(b: Body) -> m.TaskAdd:
    task_id = b.req_text("id")
    b.refuse(_TASK_REFUSED, WHY_LOCAL)
    b.accept("displayName")
    affinity = b.obj("affinityInfo")
    return m.TaskAdd(
        affinity_id=affinity.req_text("affinityId") if affinity is not None else None,
        name=task_id,
        command_line=b.req_text("commandLine"),
        resource_files=resource_files(b.objs("resourceFiles")),
        environment_settings=env_settings(b.objs("environmentSettings")),
        task_constraints=constraints(b.obj("constraints")),
        run_elevated=user_elevated(b.obj("userIdentity"), b._p("userIdentity")),
        depends_on=depends_on(b.obj("dependsOn")),
        exit_conditions=exit_conditions(b.obj("exitConditions")),
        output_files=read_output_files(b),
        required_slots=_int(b.integer("requiredSlots", 1)),
        multi_instance_settings=_multi(b.obj("multiInstanceSettings")),
    )
