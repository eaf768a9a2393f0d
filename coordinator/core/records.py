"""In-memory records of the coordinator: what the journal stores and the scheduler works on.

They are compact msgspec Structs (the journal stores them as msgpack). Tasks are the many ones:
`array_like` and `gc=False` keep a queued task well under 1 KiB.
"""

from __future__ import annotations

from collections import deque

import msgspec

from coordinator.common import models as m

from .freeslots import RunningTasks
from .states import ACTIVE as ACTIVE
from .states import COMPLETED as COMPLETED
from .states import RUNNING as RUNNING
from .states import (
    AllocState,
    JobState,
    PoolState,
    PrepState,
    TaskState,
    TvmState,
    WorkitemState,
)
from .tally import TaskTally

VM_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (cores, memory MiB, disk GiB) — the seed's sizes
    "small": (1, 1792, 70),
    "medium": (2, 3584, 135),
    "large": (4, 7168, 285),
    "extralarge": (8, 14336, 605),
}


class TaskRec(msgspec.Struct, array_like=True, gc=False, kw_only=True):
    name: str
    command_line: str
    seq: int  # submission order within the account
    created: float
    env: dict[str, str] | None = None
    resource_files: list[m.ResourceFile] | None = None
    max_wall_s: float | None = None
    max_retries: int | None = None  # None: the job's default
    retention_s: float | None = None
    run_elevated: bool = False
    job_manager: bool = False
    state: TaskState = ACTIVE
    state_time: float = 0.0
    prev_state: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    retry_count: int = 0
    requeue_count: int = 0
    last_retry: float | None = None
    last_requeue: float | None = None
    failure: tuple[str, str, str] | None = None  # (category, code, message)
    pool: str | None = None
    tvm: str | None = None
    attempt: int = 0
    # Dependencies (deps.py): the request's dependsOn as given (echoed back), what it resolved to
    # at add time (one unit per parent; "a|b" when ids equal as integers, any of them satisfies),
    # and the exit conditions that decide what this task's own outcome means to its dependents.
    depends_on: m.TaskDependencies | None = None
    deps: list[str] | None = None
    exit_conditions: m.ExitConditions | None = None
    # Workflow features (taskextras.py): what to upload after a run, the slots it takes, the files
    # it put in the coordinator's file store [(name, sha256, size)], its instances.
    output_files: list[m.OutputFile] | None = None
    slots: int = 1
    uploaded: list[tuple[str, str, int]] | None = None
    multi: m.MultiInstanceSettings | None = None  # a multi-instance task (multi.py)
    affinity: str | None = None  # a TVM it should preferably run on (scheduler.place)


# Journal kind of a task's completion delta (TaskDone): one row per task, beside its full row.
TASK_DONE = "taskdone"


class TaskDone(msgspec.Struct, array_like=True, gc=False):
    """What recording a completion changes on a task: journaled instead of the whole record (a
    completion is one small row). Restore lays it over the task's full row; any later full row of
    the task deletes it (`Runs.put_task`), so a delta is never older than the row beneath it."""

    state: TaskState
    state_time: float
    prev_state: str | None
    start_time: float | None
    end_time: float | None
    exit_code: int | None
    retry_count: int
    last_retry: float | None
    failure: tuple[str, str, str] | None
    tvm: str | None
    uploaded: list[tuple[str, str, int]] | None = None

    @classmethod
    def of(cls, t: TaskRec) -> TaskDone:
        return cls(
            t.state,
            t.state_time,
            t.prev_state,
            t.start_time,
            t.end_time,
            t.exit_code,
            t.retry_count,
            t.last_retry,
            t.failure,
            t.tvm,
            t.uploaded,
        )

    def apply(self, t: TaskRec) -> None:
        # Restore only: the journal held this state, so no transition is made here.
        t.state = self.state
        t.state_time = self.state_time
        t.prev_state = self.prev_state
        t.start_time = self.start_time
        t.end_time = self.end_time
        t.exit_code = self.exit_code
        t.retry_count = self.retry_count
        t.last_retry = self.last_retry
        t.failure = self.failure
        t.tvm = self.tvm
        t.uploaded = self.uploaded


class JobRec(msgspec.Struct, kw_only=True):
    workitem: str
    name: str
    pool: str
    priority: int
    created: float
    state: JobState = "active"
    state_time: float = 0.0
    end_time: float | None = None
    terminate_reason: str | None = None
    max_wall_s: float | None = None
    max_retries: int = 0
    common_env: dict[str, str] = {}
    # All-tasks-complete action, job manager, job-scoped credential, disable option.
    on_all_complete: str = "noaction"  # "noaction" | "terminatejob"
    jm_name: str | None = None
    jm_exclusive: bool = False
    jm_kill: bool = True
    token: str = ""
    prev_state: str | None = None
    disable_option: str = ""
    # Job preparation and release tasks (the workitem's at the job's creation).
    prep: m.JobPreparationTask | None = None
    release: m.JobReleaseTask | None = None
    uses_deps: bool = False  # usesTaskDependencies
    on_task_failure: str = "noaction"  # "noaction" | "performexitoptionsjobaction"
    max_parallel: int = -1  # maxParallelTasks: -1 no limit (scheduler.py)


class PrepRun(msgspec.Struct, kw_only=True):
    """One TVM's run of a job preparation (or release) task, over its retries."""

    state: PrepState = "pending"
    attempt: int = 0
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    retry_count: int = 0
    last_retry: float | None = None
    failure: tuple[str, str, str] | None = None  # (category, code, message)

    @property
    def succeeded(self) -> bool:
        return self.state == "completed" and self.exit_code == 0 and self.failure is None


# Journal kind of a job's preparation/release record on one TVM (key "<workitem>/<job>|<tvm>").
JOB_PREP = "jobprep"

# Journal kinds in the order a store yields them to `restore`: parents before children, so tasks
# attach to their jobs in one pass. Every store (SQLite, PostgreSQL) loads exactly these.
LOAD_ORDER = ("pool", "tvm", "workitem", "job", "task", TASK_DONE, "cert", "file", JOB_PREP)


class JobPrepRec(msgspec.Struct, kw_only=True):
    """A job's preparation and release tasks on one TVM. Kept after the TVM leaves (the status
    lists it, as Azure does) and, when the job is deleted, until its release task has ended."""

    job: str  # "<workitem>/<job>"
    tvm: str
    pool: str
    prep_name: str
    release_name: str = ""
    prep: PrepRun | None = None
    release: PrepRun | None = None
    booted: float = 0.0  # the TVM's boot time when the preparation last ran (TvmRec.booted)
    orphan: bool = False  # its job was deleted: only its release task is still awaited

    @property
    def key(self) -> str:
        return f"{self.job}|{self.tvm}"


class WorkitemRec(msgspec.Struct, kw_only=True):
    spec: m.WorkitemAdd
    created: float
    state: WorkitemState = "active"
    state_time: float = 0.0
    job_counter: int = 0
    recent_job: str | None = None
    next_run: float | None = None  # next schedule occurrence not yet used; None = no more
    end_time: float | None = None


class PoolRec(msgspec.Struct, kw_only=True):
    spec: m.PoolAdd
    created: float
    target: int
    resize_timeout_s: float = 900.0
    state: PoolState = "active"
    state_time: float = 0.0
    alloc_state: AllocState = "steady"
    alloc_time: float = 0.0
    resize_started: float | None = None
    resize_error: tuple[str, str] | None = None
    # Auto pools ("workitem" or "workitem/job" that owns it; "" for a user pool).
    auto_owner: str = ""
    auto_lifetime: str = ""  # "job" | "workitem"
    keep_alive: bool = False
    shrink_option: str = "requeue"  # tvmDeallocationOption of the last resize
    # The last autoscale run (timestamp, results, error code, error message).
    auto_scale_run: tuple[float, str, str | None, str | None] | None = None
    # Core-seconds of TVMs that have left, per half-hour interval start (usage.py).
    usage: dict[str, float] = {}


class CertRec(msgspec.Struct, kw_only=True):
    thumbprint: str  # 40 lowercase hex digits
    thumbprint_algorithm: str
    certificate_format: str
    data: bytes = msgspec.field(default=b"")
    password: str = ""
    subject: str = ""
    not_after: float = 0.0
    has_private_key: bool = False
    public_der: bytes = b""
    created: float = 0.0
    state: str = "active"
    state_time: float = 0.0

    def __repr__(self) -> str:  # certificate data and passwords never reach logs
        return f"CertRec(sha1-{self.thumbprint}, {self.certificate_format})"


class TvmUserRec(msgspec.Struct, kw_only=True):
    name: str
    ssh_public_key: str
    expiry: float
    is_admin: bool = False


class TvmRec(msgspec.Struct, kw_only=True):
    name: str
    pool: str
    agent_id: str
    created: float
    state: TvmState = "starting"
    state_time: float = 0.0
    ip: str = ""
    scheduling: str = "enabled"
    total_run: int = 0
    total_succeeded: int = 0  # of total_run: exit 0 (the Azure node's totalTasksSucceeded)
    booted: float = 0.0  # when its last reboot or reimage began (0: never; the Azure lastBootTime)
    start_task: dict[str, object] | None = None
    # Intra-pool port block, certificate install errors, remote-login users.
    port_low: int = 0
    port_high: int = 0
    cert_errors: list[str] = []
    users: list[TvmUserRec] = []
    # What a TVM waits for before it leaves / reboots / goes offline (taskcompletion),
    # and how it leaves ("requeue" | "terminate" | "taskcompletion").
    pending_op: str = ""  # "" | "leave" | "reboot" | "reimage" | "offline"
    pending_option: str = ""
    # Why the TVM is in its current state ("<Code>: <why>"), set with the state: why it is
    # `unknown` or `unusable`; "" otherwise.
    state_reason: str = ""


def modern_job_id(workitem: str, job: str, scheduled: bool) -> str:
    """The job's id in the Azure Batch API (and `AZ_BATCH_JOB_ID`): a workitem's one job is the
    workitem's name; a schedule's jobs are `S:job-N`."""
    if not scheduled:
        return workitem
    digits = job.removeprefix("job-")
    return f"{workitem}:job-{int(digits)}" if digits.isdigit() else f"{workitem}:{job}"


class JobDeps:
    """A job's dependency index (deps.py keeps it): a completion touches only its dependents."""

    __slots__ = ("dependents", "pending", "propagated", "units_done", "ints")

    def __init__(self) -> None:
        # parent name -> [(dependent name, unit)]: who to tell when the parent satisfies.
        self.dependents: dict[str, list[tuple[str, str]]] = {}
        # dependent name -> units not yet satisfied (only tasks still waiting are here).
        self.pending: dict[str, int] = {}
        # parents whose outcome satisfied (told their dependents once, never again).
        self.propagated: set[str] = set()
        # (dependent, unit) of multi-name units already satisfied by one of their names.
        self.units_done: set[tuple[str, str]] = set()
        # integer -> the job's task names that spell it ("7", "007"): built by the first add with
        # taskIdRanges, then kept as tasks are inserted and deleted (not a walk of the job per add).
        self.ints: dict[int, list[str]] | None = None


class Job:
    """A job in memory: its record, its tasks and its queue of active tasks (ready ones only: a task
    waiting for dependencies joins the queue when they are satisfied)."""

    __slots__ = ("rec", "tasks", "queue", "served", "deps", "wide", "tally", "run_s")

    def __init__(self, rec: JobRec) -> None:
        self.rec = rec
        self.tasks: dict[str, TaskRec] = {}
        self.queue: deque[TaskRec] = deque()
        self.served = (
            -1
        )  # placement counter when it last got a slot: fairness between equal priorities
        self.deps: JobDeps | None = None  # built by deps.py for a job that uses dependencies
        self.wide = False  # a task taking more than one slot was added (slotplace.py places it)
        self.tally = TaskTally()  # its task counts: every change to `tasks` or a task's state
        # How long its tasks run (a moving average of their completions; -1: none yet). Only a job
        # of short tasks is placed into agents' queues (scheduler.QUEUE_TASK_S).
        self.run_s = -1.0

    @property
    def key(self) -> str:
        return f"{self.rec.workitem}/{self.rec.name}"


class AgentInfo:
    """A registered agent (free, or backing a TVM)."""

    __slots__ = (
        "agent_id",
        "connected",
        "hostname",
        "ip",
        "cores",
        "memory_bytes",
        "disk_bytes",
        "tvm",
        "last_seen",
        "disconnected_at",
        "capabilities",
        "degraded",
        "silent",
    )

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.connected = False
        self.hostname = ""
        self.ip = ""
        self.cores = 1
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.tvm: str | None = None
        self.last_seen = 0.0
        self.disconnected_at: float | None = None
        self.capabilities: list[str] = []
        self.degraded: list[str] = []  # what the agent's host cannot enforce (Hello.degraded)
        self.silent = False  # its link was closed for a heartbeat timeout (not closed by the agent)


class Tvm:
    """A TVM in memory: its record plus what runs on it now."""

    __slots__ = ("rec", "running", "slots", "queue", "last_heartbeat", "ready", "index")

    def __init__(self, rec: TvmRec, slots: int) -> None:
        self.rec = rec
        # The pool's free-slot index while the TVM is in the store (freeslots.py keeps it exact).
        self.index: dict[str, Tvm] | None = None
        self.running: RunningTasks = RunningTasks(self)
        self.slots = slots
        # Tasks its agent may hold beyond `slots`, waiting there for a slot (freeslots.queue_depth).
        self.queue = 0
        self.last_heartbeat: float | None = None
        self.ready = False

    @property
    def free(self) -> int:
        return self.slots - len(self.running) - self.running.extra
