"""The states of tasks, TVMs, jobs, workitems and pools, and one transition table per entity.

Transitions are data (h11's `_state.py`): every state change in the core goes through the
entity's mover (`move_task`, `move_tvm`, ...), which refuses a change the table does not list with `IllegalTransition`. Staying in the same state
is not a transition and is always allowed (several commands re-journal a record unchanged).
A record is created in its initial state; that is not a transition either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol, get_args

TaskState = Literal["active", "running", "completed"]
TvmState = Literal[
    "creating",
    "starting",
    "waitingforstarttask",
    "idle",
    "running",
    "offline",
    "unusable",
    "starttaskfailed",
    "unknown",
    "leavingpool",
    "rebooting",
    "reimaging",
]
JobState = Literal[
    "active", "disabling", "disabled", "enabling", "terminating", "completed", "deleting"
]
WorkitemState = Literal["active", "disabled", "terminating", "completed"]
PoolState = Literal["active", "deleting"]
# One TVM's run of a job preparation or release task: `pending` waits to be (re)started (never
# started, its TVM lost the run, or a reboot asks for it again).
PrepState = Literal["pending", "running", "completed"]
AllocState = Literal["steady", "resizing", "stopping"]

# Task states (interned strings: every record shares the same objects).
ACTIVE: TaskState = "active"
RUNNING: TaskState = "running"
COMPLETED: TaskState = "completed"

Table = Mapping[str, frozenset[str]]

TASK: Table = {
    # placed; terminated while queued (or a late result of an earlier coordinator run)
    "active": frozenset({"running", "completed"}),
    # requeued or retried; finished, terminated or killed with its job
    "running": frozenset({"active", "completed"}),
    "completed": frozenset(),
}

_TVM_STATES: tuple[str, ...] = get_args(TvmState)
# Reachable from every other state: a fresh agent process (starting), a drain (offline), a lost
# agent (unknown), a removal (leavingpool), a failed start task (starttaskfailed).
_FROM_ANYWHERE = frozenset({"starting", "offline", "unknown", "leavingpool", "starttaskfailed"})
_RESTARTS = frozenset({"rebooting", "reimaging"})
_READY = frozenset({"idle", "running", "offline"})
# An agent may find its host state broken (task users, directories, cgroups) before the TVM is ready:
# `unusable` with a reason, from every state where the agent is alive.
_TVM_EXTRA: dict[str, frozenset[str]] = {
    "creating": _READY | {"waitingforstarttask", "unusable"},
    "starting": _READY | {"waitingforstarttask", "unusable"},
    "waitingforstarttask": _READY | _RESTARTS | {"unusable"},
    "idle": frozenset({"running", "unusable"}) | _RESTARTS,
    "running": frozenset({"idle", "unusable"}) | _RESTARTS,
    "offline": frozenset({"idle", "running", "unusable"}) | _RESTARTS,
    "unusable": frozenset({"idle", "running"}) | _RESTARTS,
    "starttaskfailed": _RESTARTS,
    "unknown": frozenset({"idle", "running", "waitingforstarttask"}),
    "leavingpool": frozenset(),
    "rebooting": _READY | {"waitingforstarttask", "unusable"},
    "reimaging": _READY | {"waitingforstarttask", "unusable"},
}
TVM: Table = {s: (_FROM_ANYWHERE | _TVM_EXTRA[s]) - {s} for s in _TVM_STATES}

JOB: Table = {
    "active": frozenset({"disabling", "terminating"}),
    "disabling": frozenset({"disabled", "active", "terminating"}),
    "disabled": frozenset({"active", "terminating"}),
    "enabling": frozenset({"active", "terminating"}),
    "terminating": frozenset({"completed"}),
    "completed": frozenset(),
    "deleting": frozenset(),
}

WORKITEM: Table = {
    "active": frozenset({"disabled", "terminating", "completed"}),
    "disabled": frozenset({"active", "terminating"}),
    "terminating": frozenset({"completed"}),
    "completed": frozenset(),
}

POOL: Table = {"active": frozenset({"deleting"}), "deleting": frozenset()}

PREP: Table = {
    # started; its run was lost (agent restarted, TVM not ready) or retried on a new attempt
    "pending": frozenset({"running"}),
    "running": frozenset({"completed", "pending"}),
    # run again after its TVM rebooted (rerunOnNodeRebootAfterSuccess)
    "completed": frozenset({"pending"}),
}

ALLOC: Table = {
    "steady": frozenset({"resizing"}),
    "resizing": frozenset({"steady", "stopping"}),
    "stopping": frozenset({"steady", "resizing"}),
}

TABLES: dict[str, Table] = {
    "task": TASK,
    "tvm": TVM,
    "job": JOB,
    "workitem": WORKITEM,
    "pool": POOL,
    "alloc": ALLOC,
    "prep": PREP,
}


class IllegalTransition(RuntimeError):
    """A state change the entity's table does not allow: a bug in the core, never a user error."""

    def __init__(self, entity: str, old: str, new: str) -> None:
        super().__init__(f"{entity}: illegal transition {old!r} -> {new!r}")
        self.entity = entity
        self.old = old
        self.new = new


def check(entity: str, old: str, new: str) -> None:
    """Raise IllegalTransition unless `old -> new` is in `entity`'s table (or old == new)."""
    if old != new and new not in TABLES[entity][old]:
        raise IllegalTransition(entity, old, new)


# One typed mover per entity: each sets the state through its table and returns the previous one.


class _Task(Protocol):
    state: TaskState
    exit_code: int | None
    failure: tuple[str, str, str] | None


class _Tally(Protocol):
    # tally.TaskTally: the job's task counts, told of every change.
    def moved(self, old: str, rec: _Task) -> None: ...


class _Tvm(Protocol):
    state: TvmState


class _Job(Protocol):
    state: JobState


class _Workitem(Protocol):
    state: WorkitemState


class _Pool(Protocol):
    state: PoolState


class _Prep(Protocol):
    state: PrepState


class _Alloc(Protocol):
    alloc_state: AllocState


def move_task(rec: _Task, new: TaskState, tally: _Tally) -> TaskState:
    """`tally` is the task's job's: a task moving to completed has its exit code and failure set
    already (they decide whether it counts as succeeded)."""
    old = rec.state
    if old != new:
        if new not in TASK[old]:
            raise IllegalTransition("task", old, new)
        rec.state = new
        tally.moved(old, rec)
    return old


def move_tvm(rec: _Tvm, new: TvmState) -> TvmState:
    old = rec.state
    if old != new and new not in TVM[old]:
        raise IllegalTransition("tvm", old, new)
    rec.state = new
    return old


def move_job(rec: _Job, new: JobState) -> JobState:
    old = rec.state
    if old != new and new not in JOB[old]:
        raise IllegalTransition("job", old, new)
    rec.state = new
    return old


def move_workitem(rec: _Workitem, new: WorkitemState) -> WorkitemState:
    old = rec.state
    if old != new and new not in WORKITEM[old]:
        raise IllegalTransition("workitem", old, new)
    rec.state = new
    return old


def move_pool(rec: _Pool, new: PoolState) -> PoolState:
    old = rec.state
    if old != new and new not in POOL[old]:
        raise IllegalTransition("pool", old, new)
    rec.state = new
    return old


def move_alloc(rec: _Alloc, new: AllocState) -> AllocState:
    old = rec.alloc_state
    if old != new and new not in ALLOC[old]:
        raise IllegalTransition("alloc", old, new)
    rec.alloc_state = new
    return old


def move_prep(rec: _Prep, new: PrepState) -> PrepState:
    old = rec.state
    if old != new and new not in PREP[old]:
        raise IllegalTransition("prep", old, new)
    rec.state = new
    return old
