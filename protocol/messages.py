"""Every message exchanged between an agent and the coordinator.

Rules (schema evolution, python-ecosystem §2): messages are tagged msgspec Structs, new fields are
appended with defaults, a field never changes type. Decoders ignore unknown fields, so a newer peer can
add fields freely; a new *message type* is answered with `Unsupported` (see `protocol.codec`).
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1
# Minor versions may add message types or fields; peers within one major version interoperate.
# 2: TaskSpec.slots is the slots a run takes (0: none), so an agent may keep its slots (TASK_QUEUE).
PROTOCOL_MINOR = 2
QUEUE_MINOR = 2  # a coordinator from this minor on says what each run takes
SUBPROTOCOL = "tvm.v1"


class Msg(msgspec.Struct, tag_field="t", omit_defaults=True, frozen=True, kw_only=True):
    """Base of every protocol message.

    Subclasses inherit `frozen` at run time, but type checkers read each class's own keywords
    (dataclass_transform), so every subclass says `frozen=True` again.
    """


# --------------------------------------------------------------------------- shared value types


class ResourceFile(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    url: str
    file_path: str
    sha256: str = ""
    size: int = -1
    # Extra request headers (the coordinator's file store needs the agent credential).
    headers: dict[str, str] = {}


class CertFile(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    thumbprint: str
    thumbprint_algorithm: str
    certificate_format: str
    data: bytes
    password: str = ""

    def __repr__(self) -> str:  # certificate data and passwords never reach logs or tracebacks
        return f"CertFile(sha1-{self.thumbprint}, {self.certificate_format})"


class OutputFileSpec(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    """Files to upload after a task's process ended (Azure's outputFiles)."""

    pattern: str  # relative to the working directory; `**`, `*`, `?`; `../` reaches the task dir
    condition: str = "taskcompletion"  # tasksuccess | taskfailure | taskcompletion
    container_url: str = ""  # "" : the coordinator's file store
    path: str = ""  # blob name (one file) or prefix (a pattern)


class OutputUploaded(msgspec.Struct, array_like=True, frozen=True):
    """A file a task uploaded to the coordinator's file store: (name, sha256, size)."""

    path: str
    sha256: str
    size: int


class TaskSpec(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    """What an agent needs to run one attempt of a task."""

    key: str  # "<workitem>/<job>/<task>", unique in the account
    attempt: int  # increases on every placement; (key, attempt) identifies one run
    command_line: str
    workitem: str
    job: str
    task: str
    env: dict[str, str] = {}  # user settings (job common + task), already merged
    resource_files: list[ResourceFile] = []
    max_wall_clock_s: float = 0.0  # 0: unlimited
    retention_s: float = 7 * 24 * 3600.0
    run_elevated: bool = False
    job_manager: bool = False
    memory_limit_bytes: int = 0
    job_id: str = ""  # the Azure id of a schedule's job (AZ_BATCH_JOB_ID); empty: `workitem`
    # The job's preparation task (its directory's name beside the task's): AZ_BATCH_JOB_PREP_DIR.
    job_prep: str = ""
    # "jobprep": this run is the job's preparation task; its directory is left readable by the
    # pool's tasks. "jobrelease": the job's release task. "": an ordinary task.
    kind: str = ""
    output_files: list[OutputFileSpec] = []
    # Variables set by the service that user settings cannot override (a multi-instance task's
    # hosts and instance index).
    system_env: dict[str, str] = {}
    slots: int = 1  # the TVM's task slots this run takes (requiredSlots)


class StartTaskSpec(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    command_line: str
    env: dict[str, str] = {}
    resource_files: list[ResourceFile] = []
    max_task_retry_count: int = 0
    wait_for_success: bool = True
    run_elevated: bool = False


class Failure(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    category: str  # "UserError" | "ServerError"
    code: str
    message: str = ""


class RunningTask(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    key: str
    attempt: int


# --------------------------------------------------------------------------- handshake (unsequenced)


class Hello(Msg, tag="hello", frozen=True, kw_only=True):
    protocol_version: int = PROTOCOL_VERSION
    protocol_minor: int = PROTOCOL_MINOR
    agent_id: str
    token: str
    capabilities: list[str] = []
    hostname: str = ""
    ip_address: str = ""
    cores: int = 1
    memory_bytes: int = 0
    disk_bytes: int = 0
    # Resume information: the coordinator session this agent last talked to and the highest
    # sequence number it received there.
    session_id: str = ""
    last_received: int = 0
    running: list[RunningTask] = []
    tvm_name: str = ""  # the TVM this agent currently backs ("" when free)
    # Runs that finished but whose completion the coordinator has not acknowledged yet: it must
    # not place them again before the (resent) completion arrives.
    finished: list[RunningTask] = []
    # Per-agent credential (issue 8): HMAC-SHA256(credential, "<agent_id>\n<proof_time>"), hex.
    proof: str = ""
    proof_time: int = 0  # unix milliseconds
    # The credential this agent made up for itself, offered with the join token when it enrols (the
    # coordinator stores it before its Welcome; every later hello only proves it).
    credential: str = ""
    # What this host cannot enforce ("<code>: <why>", tvmagent/degraded.py); [] from older agents.
    degraded: list[str] = []


class Welcome(Msg, tag="welcome", frozen=True, kw_only=True):
    protocol_version: int = PROTOCOL_VERSION
    protocol_minor: int = PROTOCOL_MINOR
    session_id: str
    resumed: bool = False
    last_received: int = 0
    heartbeat_interval: float = 5.0
    capabilities: list[str] = []
    credential: str = ""  # issued only to an agent that offered none of its own (an older agent)


class Reject(Msg, tag="reject", frozen=True, kw_only=True):
    code: str
    message: str


# --------------------------------------------------------------------------- agent -> coordinator


class Heartbeat(Msg, tag="hb", frozen=True, kw_only=True):
    running: int = 0
    cpu_percent: float = 0.0
    memory_used_bytes: int = 0
    disk_used_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    # Degraded modes found while running (None: nothing new since start-up; Hello.degraded has
    # those), and host state the agent could not repair ("": none): the TVM is `unusable` meanwhile.
    degraded: list[str] | None = None
    unusable: str = ""


class TaskStarted(Msg, tag="task.started", frozen=True, kw_only=True):
    key: str
    attempt: int
    start_time: float  # unix seconds


class TaskCompleted(Msg, tag="task.completed", frozen=True, kw_only=True):
    key: str
    attempt: int
    exit_code: int
    start_time: float
    end_time: float
    failure: Failure | None = None
    uploaded: list[OutputUploaded] = []  # output files put in the coordinator's file store


class StartTaskCompleted(Msg, tag="starttask.completed", frozen=True, kw_only=True):
    exit_code: int
    start_time: float
    end_time: float
    retry_count: int = 0
    failure: Failure | None = None


class TvmReady(Msg, tag="tvm.ready", frozen=True, kw_only=True):
    """The agent finished setting up a TVM (directories, certificates, start task if waited for)."""

    tvm_name: str
    cert_errors: list[str] = []


class StartTaskStarted(Msg, tag="starttask.started", frozen=True, kw_only=True):
    """The agent began (or retried) the pool's start task on this TVM."""

    tvm_name: str
    start_time: float
    retry_count: int = 0


class TvmLeft(Msg, tag="tvm.left", frozen=True, kw_only=True):
    """The agent finished leaving a TVM (tasks killed, directories wiped): it is free and clean."""

    tvm_name: str


class Draining(Msg, tag="draining", frozen=True, kw_only=True):
    reason: str = ""


# Failure.code of a TaskCompleted for an attempt the agent abandoned while shutting down (drain grace
# over, or a RunTask that arrived during the drain): the coordinator requeues the task, no retry used.
AGENT_STOPPING = "AgentStopping"
# Failure.code of a TaskCompleted for an attempt that waited in the agent's task queue (see
# TASK_QUEUE) longer than it should and was handed back unstarted: requeued, no retry used.
QUEUE_HANDED_BACK = "TaskQueueHandedBack"
# Hello capability: the agent keeps a queue of tasks beyond its slots and starts each the moment a
# slot frees (TaskSpec.slots says how many it takes), so the coordinator may place a few short
# tasks ahead (no round trip between one task's end and the next one's start).
TASK_QUEUE = "taskqueue"


class Unsupported(Msg, tag="unsupported", frozen=True, kw_only=True):
    """Answer to a message type the receiver does not know (an older peer)."""

    type: str


# --------------------------------------------------------------------------- coordinator -> agent


class JoinPool(Msg, tag="tvm.join", frozen=True, kw_only=True):
    pool: str
    tvm_name: str
    account: str
    account_url: str = ""
    slots: int = 1
    start_task: StartTaskSpec | None = None
    certificates: list[CertFile] = []
    port_range_low: int = 0
    port_range_high: int = 0
    # Memory of the pool's VM size; the agent gives each task slot an equal share (0: no limit).
    memory_limit_bytes: int = 0
    bubblewrap: bool = (
        False  # run the pool's tasks and start task in a bubblewrap sandbox (issue 8)
    )
    task_pids_limit: int = 0  # processes per task (0: the agent's default)
    disk_limit_bytes: int = 0  # bytes the TVM's running tasks may hold on disk (0: no limit)


class LeavePool(Msg, tag="tvm.leave", frozen=True, kw_only=True):
    """Give the TVM back: kill what runs, wipe the TVM's directories, return to the free inventory."""

    tvm_name: str
    reason: str = ""


class RebootTvm(Msg, tag="tvm.reboot", frozen=True, kw_only=True):
    """Restart the TVM's sandbox: kill every task process; `reimage` also wipes its directories.
    The coordinator follows with a JoinPool for the same TVM, which re-runs the start task."""

    tvm_name: str
    reimage: bool = False


class RunTask(Msg, tag="task.run", frozen=True, kw_only=True):
    spec: TaskSpec


class CancelTask(Msg, tag="task.cancel", frozen=True, kw_only=True):
    key: str
    attempt: int
    reason: str = "terminated"


class DeleteTaskFiles(Msg, tag="task.delete_files", frozen=True, kw_only=True):
    key: str


class PoolMembers(Msg, tag="pool.members", frozen=True, kw_only=True):
    addresses: list[str]
    # The pool the list is for: one that arrives while the agent still leaves its old pool must not
    # be dropped by that teardown, nor an old pool's list be applied to the new one ("": any).
    pool: str = ""


class Ping(Msg, tag="ping", frozen=True, kw_only=True):
    pass


class FileRequest(Msg, tag="file.request", frozen=True, kw_only=True):
    """Ask the agent about files under its TVM root (task and TVM file APIs)."""

    req_id: int
    op: str  # "list" | "read" | "stat" | "delete"
    path: str  # relative to the TVM root
    recursive: bool = False
    offset: int = 0
    length: int = -1


class AddUser(Msg, tag="user.add", frozen=True, kw_only=True):
    """Create a remote-login user on the TVM (Linux user + authorized_keys) until `expiry` (unix s)."""

    name: str
    ssh_public_key: str
    expiry: float
    is_admin: bool = False


class RemoveUser(Msg, tag="user.remove", frozen=True, kw_only=True):
    name: str


class NodeUserRequest(Msg, tag="nodeuser.request", frozen=True, kw_only=True):
    """Create ("add"), replace ("update") or delete ("delete") a node user's Linux account on the
    TVM's host; answered by a NodeUserResponse with the same req_id. The password travels only as
    its crypt(3) hash."""

    req_id: int
    op: str
    name: str
    password_hash: str = ""  # "": no password (key login only)
    ssh_public_key: str = ""
    expiry: float = 0.0  # unix s
    is_admin: bool = False


class NodeUserResponse(Msg, tag="nodeuser.response", frozen=True, kw_only=True):
    req_id: int
    error_code: str = ""  # "": done; else an Azure code (NodeUserExists, NodeUserNotFound, ...)
    message: str = ""


class FileEntry(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    name: str
    is_directory: bool = False
    size: int = 0
    mtime: float = 0.0


class FileResponse(Msg, tag="file.response", frozen=True, kw_only=True):
    req_id: int
    error_code: str = ""
    message: str = ""
    entries: list[FileEntry] = []
    data: bytes = b""
    size: int = 0
    mtime: float = 0.0


AgentMsg = (
    Heartbeat
    | TaskStarted
    | TaskCompleted
    | StartTaskCompleted
    | TvmReady
    | Draining
    | FileResponse
    | NodeUserResponse
    | Unsupported
    | StartTaskStarted
    | TvmLeft
)
CoordinatorMsg = (
    JoinPool
    | LeavePool
    | RunTask
    | CancelTask
    | DeleteTaskFiles
    | PoolMembers
    | Ping
    | FileRequest
    | Unsupported
    | AddUser
    | RemoveUser
    | RebootTvm
    | NodeUserRequest
)
HandshakeMsg = Hello | Welcome | Reject


class Frame(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One websocket message: a batch of consecutive sequenced messages plus a cumulative ack."""

    first: int = 0  # sequence number of msgs[0]
    ack: int = 0  # highest sequence number the sender has received from the peer
    msgs: list[msgspec.Raw] = []
