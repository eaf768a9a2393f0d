"""REST resource shapes (the seed's JSON names), shared by the server and the Python client.

One Struct per request/response body, camelCase on the wire. Request types reject unknown fields
(typos become clear 400s); response types ignore them so an older client reads a newer server.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# Every integer a request carries fits in 32 bits (as Azure's own Int32 fields); file sizes in 63.
# Without the bound a JSON number such as 1e30 would be taken, stored and then fail every journal
# write of its object (msgpack holds 64 bits).
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Size = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Req(
    msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True, forbid_unknown_fields=True
):
    pass


class _Res(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    pass


# --------------------------------------------------------------------------- shared pieces


class EnvironmentSetting(_Res, forbid_unknown_fields=True):
    name: str
    value: str = ""


class ResourceFile(_Res, forbid_unknown_fields=True):
    blob_source: str
    file_path: str
    sha256: str | None = None
    file_size: Size | None = None


class TaskConstraints(_Res, forbid_unknown_fields=True):
    max_wall_clock_time: str | None = None
    max_task_retry_count: Int32 | None = None
    retention_time: str | None = None


class JobConstraints(_Res, forbid_unknown_fields=True):
    max_wall_clock_time: str | None = None
    max_task_retry_count: Int32 | None = None


class StartTask(_Res, forbid_unknown_fields=True):
    command_line: str
    resource_files: list[ResourceFile] = []
    environment_settings: list[EnvironmentSetting] = []
    max_task_retry_count: Int32 = 0
    wait_for_success: bool = True
    run_elevated: bool = False


class CertificateReference(_Res, forbid_unknown_fields=True):
    thumbprint: str
    thumbprint_algorithm: str = "sha1"


class MetadataItem(_Res, forbid_unknown_fields=True):
    name: str
    value: str = ""


class SchedulingError(_Res):
    category: str
    code: str
    message: str = ""


class ResizeError(_Res):
    code: str
    message: str = ""


# --------------------------------------------------------------------------- pools and TVMs


class PoolAdd(_Req):
    name: str
    vm_size: str = "small"
    target_dedicated: Int32 = 0
    # rename="camel" would spell it maxTasksPerVm; the contract (DESIGN.md §6) says maxTasksPerVM.
    max_tasks_per_vm: Int32 = msgspec.field(default=1, name="maxTasksPerVM")
    tvm_fill_type: str = "spread"
    start_task: StartTask | None = None
    communication: bool = False
    certificate_references: list[CertificateReference] = []
    enable_auto_scale: bool = False
    auto_scale_formula: str | None = None
    auto_scale_evaluation_interval: str | None = None
    resize_timeout: str | None = None
    metadata: list[MetadataItem] = []
    bubblewrap: bool = False  # run this pool's tasks in a bubblewrap sandbox (issue 8)
    # Per-task process limit (pids cgroup; None: the agent's default, 4,096) and the TVM's disk limit
    # for the files of its running tasks (None: only the host's nearly-full check). See _pool_limits.py.
    task_pids_limit: Int32 | None = None
    tvm_disk_limit_mib: Int32 | None = msgspec.field(default=None, name="tvmDiskLimitMiB")
    # What only the Azure routes carry (displayName, the Azure VM size name, the image reference):
    # kept with the spec and echoed back there; the seed's routes refuse it.
    azure: dict | None = None
    # How long a TVM whose agent is gone stays `unknown` before it leaves the pool and is replaced
    # (ISO 8601 duration; None: the coordinator's unknown-tvm-timeout, 2 minutes by default).
    unknown_tvm_timeout: str | None = None


class Pool(_Res):
    name: str
    state: str
    allocation_state: str
    vm_size: str
    target_dedicated: int
    current_dedicated: int
    max_tasks_per_vm: int = msgspec.field(name="maxTasksPerVM")
    tvm_fill_type: str
    creation_time: str
    state_transition_time: str
    allocation_state_transition_time: str
    resize_timeout: str = "PT15M"
    start_task: StartTask | None = None
    communication: bool = False
    certificate_references: list[CertificateReference] = []
    enable_auto_scale: bool = False
    auto_scale_formula: str | None = None
    auto_scale_evaluation_interval: str | None = None
    resize_error: ResizeError | None = None
    metadata: list[MetadataItem] = []
    auto_scale_run: AutoScaleRun | None = None  # the last autoscale evaluation (issue 7)
    bubblewrap: bool = False  # issue 8
    task_pids_limit: int | None = None
    tvm_disk_limit_mib: int | None = msgspec.field(default=None, name="tvmDiskLimitMiB")
    unknown_tvm_timeout: str | None = None


class PoolResize(_Req):
    target_dedicated: Int32
    resize_timeout: str | None = None
    tvm_deallocation_option: str = "requeue"


class TvmRemove(_Req):
    tvm_names: list[str]
    tvm_deallocation_option: str = "requeue"
    resize_timeout: str | None = None


class TvmReboot(_Req):
    tvm_reboot_option: str = "requeue"


class TvmReimage(_Req):
    tvm_reimage_option: str = "requeue"


class TvmDisableScheduling(_Req):
    tvm_disable_scheduling_option: str = "requeue"


class VmSize(_Res):
    name: str
    cores: int
    memory_mib: int
    disk_gib: int = 0
    max_tasks_per_vm: int = msgspec.field(default=4, name="maxTasksPerVM")
    source: str = "builtin"  # "builtin" | "agent" (the real size of a registered agent's machine)


class StartTaskInfo(_Res, kw_only=True):
    state: str
    start_time: str | None = None
    end_time: str | None = None
    exit_code: int | None = None
    retry_count: int  # always on the wire, like Azure (omit_defaults would drop a 0)
    scheduling_error: SchedulingError | None = None


class TaskInformation(_Res):
    workitem_name: str
    job_name: str
    task_name: str
    task_state: str


class Tvm(_Res, kw_only=True):
    name: str
    state: str
    pool_name: str
    ip_address: str
    vm_size: str
    state_transition_time: str
    allocation_time: str
    scheduling_state: str = "enabled"
    running_tasks_count: int
    total_tasks_run: int
    start_task_info: StartTaskInfo | None = None
    recent_tasks: list[TaskInformation] = []
    agent_id: str = ""
    hostname: str = ""
    cores: int = 0
    memory_bytes: int = 0
    last_heartbeat_time: str | None = None
    cert_errors: list[str] = []  # certificates this TVM could not install (issue 8)
    degraded_modes: list[str] = []  # what its agent's host cannot enforce ("<code>: <why>")
    state_reason: str = ""  # why it is `unknown` or `unusable` ("<Code>: <why>")
    port_range_low: int = 0
    port_range_high: int = 0
    running_task_slots_count: int = 0


# --------------------------------------------------------------------------- workitems and jobs


class JobManager(_Res, forbid_unknown_fields=True):
    name: str
    command_line: str
    resource_files: list[ResourceFile] = []
    environment_settings: list[EnvironmentSetting] = []
    task_constraints: TaskConstraints | None = None
    kill_job_on_completion: bool = True
    run_elevated: bool = False
    run_exclusive: bool = True


class JobPreparationTask(_Res, forbid_unknown_fields=True, kw_only=True):
    """Runs on a TVM before the job's first task there (reference §1.5.3)."""

    name: str = "jobpreparation"
    command_line: str
    resource_files: list[ResourceFile] = []
    environment_settings: list[EnvironmentSetting] = []
    task_constraints: TaskConstraints | None = None
    wait_for_success: bool = True
    rerun_on_tvm_reboot_after_success: bool = True
    run_elevated: bool = False


class JobReleaseTask(_Res, forbid_unknown_fields=True, kw_only=True):
    """Runs when the job ends on every TVM that ran its preparation task (reference §1.5.4)."""

    name: str = "jobrelease"
    command_line: str
    resource_files: list[ResourceFile] = []
    environment_settings: list[EnvironmentSetting] = []
    max_wall_clock_time: str | None = None  # default and maximum PT15M
    retention_time: str | None = None
    run_elevated: bool = False


class JobExecutionEnvironment(_Res, forbid_unknown_fields=True):
    pool_name: str | None = None
    auto_pool_specification: dict | None = None


class Schedule(_Res, forbid_unknown_fields=True):
    do_not_run_until: str | None = None
    do_not_run_after: str | None = None
    start_window: str | None = None
    recurrence_interval: str | None = None


class WorkitemAdd(_Req):
    name: str
    job_execution_environment: JobExecutionEnvironment
    priority: Int32 = 0
    job_constraints: JobConstraints | None = None
    job_manager: JobManager | None = None
    schedule: Schedule | None = None
    common_environment_settings: list[EnvironmentSetting] = []
    metadata: list[MetadataItem] = []
    on_all_tasks_complete: str = "noaction"  # "noaction" | "terminatejob" (issue 6)
    azure: dict | None = None  # as PoolAdd.azure
    job_preparation_task: JobPreparationTask | None = None
    job_release_task: JobReleaseTask | None = None
    uses_task_dependencies: bool = False
    on_task_failure: str = "noaction"  # "noaction" | "performexitoptionsjobaction"
    # the most tasks of a job that run at once (its job manager not counted); -1: no limit
    max_parallel_tasks: Int32 = -1


class WorkitemExecutionInfo(_Res):
    recent_job: str | None = None
    next_run_time: str | None = None
    end_time: str | None = None


class Workitem(_Res, kw_only=True):
    name: str
    state: str
    creation_time: str
    state_transition_time: str
    job_execution_environment: JobExecutionEnvironment
    priority: int
    job_constraints: JobConstraints | None = None
    job_manager: JobManager | None = None
    schedule: Schedule | None = None
    common_environment_settings: list[EnvironmentSetting] = []
    execution_info: WorkitemExecutionInfo | None = None
    metadata: list[MetadataItem] = []
    on_all_tasks_complete: str = "noaction"
    job_preparation_task: JobPreparationTask | None = None
    job_release_task: JobReleaseTask | None = None
    uses_task_dependencies: bool = False
    on_task_failure: str = "noaction"
    max_parallel_tasks: int = -1


class JobExecutionInfo(_Res):
    start_time: str
    pool_name: str
    end_time: str | None = None
    terminate_reason: str | None = None


class TaskCounts(_Res, omit_defaults=False):  # zero counts are shown, not dropped
    active: int = 0
    running: int = 0
    completed: int = 0
    succeeded: int = 0
    failed: int = 0


class Job(_Res):
    name: str
    workitem_name: str
    state: str
    priority: int
    creation_time: str
    state_transition_time: str
    execution_info: JobExecutionInfo
    task_counts: TaskCounts | None = None
    previous_state: str | None = None
    on_all_tasks_complete: str = "noaction"
    job_constraints: JobConstraints | None = None
    job_manager_task_name: str | None = None
    max_parallel_tasks: int = -1


# --------------------------------------------------------------------------- tasks


class TaskIdRange(_Res, forbid_unknown_fields=True):
    start: Int32
    end: Int32


class TaskDependencies(_Res, forbid_unknown_fields=True):
    task_ids: list[str] = []
    task_id_ranges: list[TaskIdRange] = []


class ExitOptions(_Res, forbid_unknown_fields=True):
    job_action: str | None = None  # none | disable | terminate
    dependency_action: str | None = None  # satisfy | block


class ExitCodeMapping(_Res, forbid_unknown_fields=True):
    code: Int32
    exit_options: ExitOptions


class ExitCodeRangeMapping(_Res, forbid_unknown_fields=True):
    start: Int32
    end: Int32
    exit_options: ExitOptions


class ExitConditions(_Res, forbid_unknown_fields=True):
    exit_codes: list[ExitCodeMapping] = []
    exit_code_ranges: list[ExitCodeRangeMapping] = []
    pre_processing_error: ExitOptions | None = None
    file_upload_error: ExitOptions | None = None
    default: ExitOptions | None = None


class OutputFileContainer(_Res, forbid_unknown_fields=True):
    """An Azure Storage container (or any server taking `PUT` BlockBlobs) by a SAS URL."""

    container_url: str
    path: str | None = None


class OutputFileStore(_Res, forbid_unknown_fields=True):
    """The coordinator's own file store; `path` names the upload on the task's record."""

    path: str | None = None


class OutputFileDestination(_Res, forbid_unknown_fields=True):
    container: OutputFileContainer | None = None
    file_store: OutputFileStore | None = None


class OutputFileUploadOptions(_Res, forbid_unknown_fields=True):
    upload_condition: str = "taskcompletion"  # tasksuccess | taskfailure | taskcompletion


class OutputFile(_Res, forbid_unknown_fields=True):
    file_pattern: str
    destination: OutputFileDestination
    upload_options: OutputFileUploadOptions = msgspec.field(default_factory=OutputFileUploadOptions)


class MultiInstanceSettings(_Res, forbid_unknown_fields=True):
    number_of_instances: Int32 = 1
    coordination_command_line: str | None = None
    common_resource_files: list[ResourceFile] = []


class SubtaskInfo(_Res):
    """One instance of a multi-instance task (instance 0 runs on the primary TVM)."""

    id: int
    state: str
    tvm_name: str
    exit_code: int | None = None
    start_time: str | None = None
    end_time: str | None = None
    scheduling_error: SchedulingError | None = None


class OutputFileResult(_Res):
    """One file a task uploaded to the coordinator's file store."""

    path: str
    sha256: str
    size: int


class TaskAdd(_Req):
    name: str
    command_line: str
    resource_files: list[ResourceFile] = []
    environment_settings: list[EnvironmentSetting] = []
    task_constraints: TaskConstraints | None = None
    run_elevated: bool = False
    depends_on: TaskDependencies | None = None
    exit_conditions: ExitConditions | None = None
    output_files: list[OutputFile] = []
    required_slots: Int32 = 1
    multi_instance_settings: MultiInstanceSettings | None = None
    # a TVM's name the task should preferably run on (Azure's affinityInfo: a soft hint)
    affinity_id: str | None = None


class TaskAddCollection(_Req):
    value: list[TaskAdd]


class TaskAddResult(_Res):
    name: str
    status: str  # "success" | "clienterror" | "servererror"
    error: dict | None = None


class TaskAddCollectionResult(_Res):
    value: list[TaskAddResult]


class TaskUpdate(_Req):
    task_constraints: TaskConstraints | None = None


class TaskExecutionInfo(_Res, kw_only=True):
    start_time: str | None = None
    end_time: str | None = None
    exit_code: int | None = None
    retry_count: int
    requeue_count: int
    last_retry_time: str | None = None
    last_requeue_time: str | None = None
    scheduling_error: SchedulingError | None = None


class TvmInfo(_Res):
    pool_name: str
    tvm_name: str


class Task(_Res):
    name: str
    state: str
    command_line: str
    creation_time: str
    state_transition_time: str
    environment_settings: list[EnvironmentSetting] = []
    resource_files: list[ResourceFile] = []
    task_constraints: TaskConstraints | None = None
    run_elevated: bool = False
    previous_state: str | None = None
    execution_info: TaskExecutionInfo | None = None
    tvm_info: TvmInfo | None = None
    depends_on: TaskDependencies | None = None
    exit_conditions: ExitConditions | None = None
    # An active task whose dependencies are not all satisfied: "waiting" or "blocked", and why.
    dependency_state: str | None = None
    dependency_reason: str | None = None
    output_files: list[OutputFile] = []
    required_slots: int = 1
    output_file_results: list[OutputFileResult] = []
    multi_instance_settings: MultiInstanceSettings | None = None
    subtasks: list[SubtaskInfo] = []
    affinity_id: str | None = None


# --------------------------------------------------------------------------- files and errors


class FileProperties(_Res):
    content_length: int
    last_modified: str


class NodeFile(_Res):
    name: str
    is_directory: bool
    properties: FileProperties | None = None


class ErrorMessage(_Res, omit_defaults=False):  # the wire shape always carries `lang`
    lang: str = "en-us"
    value: str = ""


class ErrorDetail(_Res):
    key: str
    value: str


class ErrorBody(_Res):
    code: str
    message: ErrorMessage
    values: list[ErrorDetail] = []


# --------------------------------------------------------------------------- certificates (issue 8)


class CertificateAdd(_Req):
    thumbprint: str
    thumbprint_algorithm: str
    data: str  # base64
    certificate_format: str = "pfx"
    password: str | None = None


class Certificate(_Res):
    thumbprint: str
    thumbprint_algorithm: str
    state: str
    state_transition_time: str
    certificate_format: str = ""
    subject: str = ""
    expiry: str = ""
    has_private_key: bool = False
    public_data: str = ""  # base64 DER of the certificate (never the pfx or its password)
    pools: list[str] = []  # pools that reference it


# --------------------------------------------------------------------------- keys, agents, remote login (issue 8)


class RegenerateKey(_Req):
    key_name: str  # "primary" | "secondary"


class AccountKeys(_Res):
    account_name: str
    primary: str
    secondary: str


class AgentTokenAdd(_Req):
    expires_in: str | None = None  # ISO 8601 duration (PT1H); absent: never expires
    single_use: bool = False  # enrols exactly one agent id


class AgentToken(_Res):
    id: str
    creation_time: str
    expiry_time: str | None = None
    single_use: bool = False
    used_by: str = ""  # the agent id a single-use token enrolled
    token: str = ""  # the secret: only in the answer to its creation


class TvmUserAdd(_Req):
    name: str
    ssh_public_key: str
    expiry_time: str | None = None  # RFC 3339; default one day from now
    is_admin: bool = False


class TvmUser(_Res):
    name: str
    expiry_time: str
    ssh_public_key: str = ""
    is_admin: bool = False


class RemoteLoginSettings(_Res):
    remote_login_ip_address: str
    remote_login_port: int = 22


# --------------------------------------------------------------------------- workitem and job operations (issue 6)


class WorkitemUpdate(_Req):
    """PATCH /workitems/{wi}: only the fields present change; they apply to jobs created later."""

    priority: Int32 | None = None
    job_constraints: JobConstraints | None = None
    schedule: Schedule | None = None
    on_all_tasks_complete: str | None = None
    metadata: list[MetadataItem] | None = None
    max_parallel_tasks: Int32 | None = None


class PrepTaskExecutionInfo(_Res, kw_only=True):
    """One TVM's run of a job preparation or release task."""

    state: str  # "running" | "completed" ("pending": to be run again, e.g. after its TVM was lost)
    start_time: str | None = None
    end_time: str | None = None
    exit_code: int | None = None
    retry_count: int = 0
    last_retry_time: str | None = None
    result: str | None = None  # "success" | "failure" once completed
    task_root_directory: str = ""
    scheduling_error: SchedulingError | None = None


class JobPrepReleaseStatus(_Res, kw_only=True):
    pool_name: str
    tvm_name: str
    job_preparation_task_execution_info: PrepTaskExecutionInfo | None = None
    job_release_task_execution_info: PrepTaskExecutionInfo | None = None


class JobUpdate(_Req):
    """PATCH /workitems/{wi}/jobs/{job}: only the fields present change."""

    priority: Int32 | None = None
    job_constraints: JobConstraints | None = None
    on_all_tasks_complete: str | None = None
    max_parallel_tasks: Int32 | None = None


class JobTerminate(_Req):
    terminate_reason: str | None = None


class JobDisable(_Req):
    disable_tasks: str = "requeue"  # "requeue" | "terminate" | "wait"


# --------------------------------------------------------------------------- autoscale (issue 7)


class AutoScaleRunError(_Res):
    code: str
    message: str = ""


class AutoScaleRun(_Res):
    """pool.autoScaleRun and the answer of evaluateautoscale: `results` is `$name=value;...`."""

    timestamp: str
    results: str = ""
    error: AutoScaleRunError | None = None


class PoolEnableAutoScale(_Req):
    """POST /pools/{pool}/enableautoscale: the formula is required unless autoscale is already on."""

    auto_scale_formula: str | None = None
    auto_scale_evaluation_interval: str | None = None


class PoolEvaluateAutoScale(_Req):
    auto_scale_formula: str
