"""The agent's decisions as a pure state machine: `AgentState.handle(event) -> list[Instruction]`.

What to run, cancel, defer, hand back, report and delete is decided here, from events the Trio
shell (tvmagent/agent.py and its parts) feeds in; the shell only carries the instructions out
(sends, spawns, kills, file deletions). No trio, os, subprocess or socket here: every decision can
be driven in a plain unit test (tests/unit/test_agent_state.py).

The rules it keeps:
* A RunTask while draining, or while no TVM is set up, is answered at once with a TaskCompleted the
  coordinator requeues (AgentStopping) or reports (TVMNotReady).
* A RunTask for a task whose older attempt still runs (being cancelled after a requeue) waits: the
  new attempt starts when the old run has ended (they share the task directory). A second RunTask
  for the same attempt is a duplicate and ignored.
* A completion stays "unacknowledged" until the coordinator's cumulative ack passes its sequence
  number; each Hello reports the running attempts and the unacknowledged completions, so a
  coordinator that lost the link can requeue exactly the tasks nobody will report.
* A finished task's directory may be deleted at its retention deadline, never while it runs again.
* A run killed by the drain is reported as AgentStopping, so the coordinator requeues it.
* TVM operations (join, leave, reboot) are carried out one at a time in arrival order; a leave or
  reboot interrupts the start task of the same TVM first.
* Runs take the TVM's slots; a task that arrives when they are taken waits in arrival order
  (tvmagent/taskqueue.py) and starts when its slots free. A waiting task that is cancelled, deleted
  or caught by a drain, leave or reboot is answered at once without running; one that waited
  `taskqueue.WAIT_S` is handed back (QUEUE_HANDED_BACK) for the coordinator to place elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from protocol import messages as pm
from protocol.exitcodes import NO_EXIT_CODE, WALL_CLOCK_EXIT_CODE

from .identity import FATAL_REJECTS
from .taskqueue import WAIT_S, Slots

DISK_LIMIT_CODE = "DiskLimitExceeded"


@dataclass
class Run:
    """One attempt the agent is running (or about to). Mutable: cancellation marks it."""

    spec: pm.TaskSpec
    cancelled: bool = False
    cancel_reason: str = ""
    cancel_code: str = "TaskEnded"  # the failure code of a killed run (DiskLimitExceeded, ...)
    abandoned: bool = False  # killed by the drain: reported as AGENT_STOPPING so it is requeued


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class RunTaskReceived:
    spec: pm.TaskSpec
    now: float


@dataclass(frozen=True, slots=True)
class CancelReceived:
    key: str
    attempt: int
    reason: str
    now: float = 0.0  # when it arrived (the end time of a task cancelled while it waited)


@dataclass(frozen=True, slots=True)
class RunFinished:
    """A run's process has ended (or never started); `failure` is the runner's verdict."""

    key: str
    exit_code: int
    start_time: float
    end_time: float
    failure: pm.Failure | None
    peer_acked: int  # the coordinator's cumulative ack now: completions up to it are forgotten
    uploaded: list[pm.OutputUploaded] = field(default_factory=list)  # to the file store


@dataclass(frozen=True, slots=True)
class CompletionQueued:
    """The shell queued a TaskCompleted on the link session under sequence number `seq`."""

    key: str
    attempt: int
    seq: int


@dataclass(frozen=True, slots=True)
class SessionRestarted:
    """The coordinator did not resume the session: acked completions are forgotten (`peer_acked`
    of the old session) and the rest renumbered down by `shift`."""

    peer_acked: int
    shift: int


@dataclass(frozen=True, slots=True)
class TvmOpReceived:
    msg: pm.JoinPool | pm.LeavePool | pm.RebootTvm


@dataclass(frozen=True, slots=True)
class TvmSetUp:
    tvm_name: str
    slots: int = 0  # the TVM's task slots (0: no limit kept here)


@dataclass(frozen=True, slots=True)
class WipeStarted:
    """The TVM leaves (or another replaces it): nothing deferred starts, every run is killed."""


@dataclass(frozen=True, slots=True)
class TvmWiped:
    """Its directories are gone: no TVM, no retention deadlines."""


@dataclass(frozen=True, slots=True)
class RebootStarted:
    """A reboot or reimage: every run is killed (the coordinator requeues them)."""


@dataclass(frozen=True, slots=True)
class Reimaged:
    """The runs are gone and so are the task directories: no retention deadlines."""


@dataclass(frozen=True, slots=True)
class StartTaskBegan:
    run: Run


@dataclass(frozen=True, slots=True)
class StartTaskEnded:
    run: Run


@dataclass(frozen=True, slots=True)
class DrainStarted:
    pass


@dataclass(frozen=True, slots=True)
class DrainGraceOver:
    pass


@dataclass(frozen=True, slots=True)
class RetentionLoaded:
    """Deadlines a previous agent process recorded beside the task directories."""

    deadlines: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class RetentionSweep:
    now: float


@dataclass(frozen=True, slots=True)
class DeleteFilesReceived:
    key: str


@dataclass(frozen=True, slots=True)
class Welcomed:
    """A coordinator accepted the link; `minor`: its protocol minor version."""

    minor: int


@dataclass(frozen=True, slots=True)
class QueueTick:
    """Time passes: tasks that waited too long for a slot are handed back."""

    now: float


@dataclass(frozen=True, slots=True)
class DiskMeasured:
    """Bytes held by each running task's directory, against the TVM's limit for all of them."""

    usage: Mapping[str, int]
    limit_bytes: int


Event = (
    RunTaskReceived
    | CancelReceived
    | RunFinished
    | CompletionQueued
    | SessionRestarted
    | TvmOpReceived
    | TvmSetUp
    | WipeStarted
    | TvmWiped
    | RebootStarted
    | Reimaged
    | StartTaskBegan
    | StartTaskEnded
    | DrainStarted
    | DrainGraceOver
    | RetentionLoaded
    | RetentionSweep
    | DeleteFilesReceived
    | DiskMeasured
    | QueueTick
    | Welcomed
)


# ----------------------------------------------------------------------------- instructions


@dataclass(frozen=True, slots=True)
class Send:
    msg: pm.Msg


@dataclass(frozen=True, slots=True)
class SendCompletion:
    """Queue this TaskCompleted and report its sequence number back (`CompletionQueued`)."""

    msg: pm.TaskCompleted


@dataclass(frozen=True, slots=True)
class StartRun:
    spec: pm.TaskSpec


@dataclass(frozen=True, slots=True)
class KillProcess:
    """Kill the run's process tree if it has one yet (a run checks `cancelled` once it spawned)."""

    key: str


@dataclass(frozen=True, slots=True)
class KillStartTask:
    pass


@dataclass(frozen=True, slots=True)
class SaveRetention:
    key: str
    deadline: float


@dataclass(frozen=True, slots=True)
class DeleteTaskFiles:
    key: str
    cleaned: bool  # retention expired: leave a marker so the file APIs answer "cleaned up"


@dataclass(frozen=True, slots=True)
class QueueTvmOp:
    msg: pm.JoinPool | pm.LeavePool | pm.RebootTvm


@dataclass(frozen=True, slots=True)
class Warn:
    """Something worth a log line (the shell logs it)."""

    text: str


Instruction = (
    Send
    | SendCompletion
    | StartRun
    | KillProcess
    | KillStartTask
    | SaveRetention
    | DeleteTaskFiles
    | QueueTvmOp
    | Warn
)


def _handed_back(key: str, attempt: int, now: float, code: str, message: str) -> SendCompletion:
    return SendCompletion(
        pm.TaskCompleted(
            key=key,
            attempt=attempt,
            exit_code=NO_EXIT_CODE,
            start_time=now,
            end_time=now,
            failure=pm.Failure(category="ServerError", code=code, message=message),
        )
    )


def rejected_for_good(code: str) -> bool:
    """A Reject the agent gives up on (bad credentials, revoked, wrong version), against one it retries
    with backoff: AgentAlreadyConnected (the coordinator still hears this agent's previous link: a
    restart faster than the coordinator noticed, or someone else holding the credential) clears once
    that link is closed or presumed dead."""
    return code in FATAL_REJECTS


def run_verdict(
    run: Run, exit_code: int, reason: str, message: str, timed_out: bool
) -> tuple[int, pm.Failure | None]:
    """A spawned run's exit code and failure from how its process ended (`reason`: the sandbox's
    "exited", "launch_failed", "oom"...). (code, None) may still fail the disk check afterwards."""
    spec = run.spec
    if timed_out:
        return WALL_CLOCK_EXIT_CODE, pm.Failure(
            category="ServerError",
            code="TaskEnded",
            message=f"maxWallClockTime of {spec.max_wall_clock_s:g} s exceeded; the task's process tree was killed",
        )
    if reason == "launch_failed":
        return exit_code, pm.Failure(
            category="UserError", code="CommandLaunchFailed", message=message
        )
    if reason == "oom":
        return exit_code, pm.Failure(
            category="UserError", code="TaskMemoryLimitExceeded", message=message
        )
    if run.cancelled:
        return exit_code, pm.Failure(
            category="UserError", code=run.cancel_code, message=f"task killed: {run.cancel_reason}"
        )
    return exit_code, None


@dataclass
class AgentState:
    tvm_name: str | None = None  # the TVM this agent backs (set up or being set up)
    draining: bool = False
    running: dict[str, Run] = field(default_factory=dict)
    deferred: dict[str, pm.TaskSpec] = field(
        default_factory=dict
    )  # key -> new attempt waiting for the old run
    # task key -> (attempt, seq of its TaskCompleted) until the coordinator acknowledges it
    unacked_done: dict[str, tuple[int, int]] = field(default_factory=dict)
    retention: dict[str, float] = field(
        default_factory=dict
    )  # task key -> unix time its files may go
    start_run: Run | None = None  # the start task's current run (a leave or reboot interrupts it)
    slots: Slots = field(default_factory=Slots)  # the TVM's slots and the tasks waiting for one

    # ------------------------------------------------------------------ queries

    def hello_running(self) -> list[pm.RunningTask]:
        return [pm.RunningTask(key=k, attempt=r.spec.attempt) for k, r in self.running.items()]

    def hello_finished(self, peer_acked: int) -> list[pm.RunningTask]:
        """Completions the coordinator has not acknowledged: it must not requeue these."""
        return [
            pm.RunningTask(key=k, attempt=a)
            for k, (a, seq) in self.unacked_done.items()
            if seq > peer_acked
        ]

    def acked(self, peer_acked: int) -> None:
        """The coordinator acknowledged up to `peer_acked`: those completions are durable there."""
        for key in [k for k, (_, seq) in self.unacked_done.items() if seq <= peer_acked]:
            del self.unacked_done[key]

    # ------------------------------------------------------------------ events

    def handle(self, ev: Event) -> list[Instruction]:
        handler = _HANDLERS[type(ev)]
        return handler(self, ev)  # type: ignore[operator]

    def _run_task(self, ev: RunTaskReceived) -> list[Instruction]:
        spec = ev.spec
        if self.draining:  # placed before the coordinator saw our Draining: hand it back
            return [
                _handed_back(
                    spec.key, spec.attempt, ev.now, pm.AGENT_STOPPING, "the agent is stopping"
                )
            ]
        old = self.running.get(spec.key)
        if old is not None and old.spec.attempt != spec.attempt and self.tvm_name is not None:
            # A requeued task placed here again while its old run is still being cancelled: start the
            # new run as soon as the old one has ended (same task directory).
            self.deferred[spec.key] = spec
            return []
        if self.tvm_name is None:
            return [_handed_back(spec.key, spec.attempt, ev.now, "TVMNotReady", "agent has no TVM")]
        if old is not None:
            return []  # the same attempt again: already running
        self.running[spec.key] = Run(spec)
        if not self.slots.admit(spec, ev.now):
            return []  # waits for a slot
        return [StartRun(spec)]

    def _unstarted(
        self, spec: pm.TaskSpec, since: float, now: float, failure: pm.Failure
    ) -> SendCompletion:
        """A waiting task answered without running (it never took a slot nor made a directory)."""
        del self.running[spec.key]
        return SendCompletion(
            pm.TaskCompleted(
                key=spec.key,
                attempt=spec.attempt,
                exit_code=NO_EXIT_CODE,
                start_time=since,
                end_time=max(now, since),
                failure=failure,
            )
        )

    def _cancel(self, ev: CancelReceived) -> list[Instruction]:
        waiting = self.deferred.get(ev.key)
        if waiting is not None and waiting.attempt == ev.attempt:
            del self.deferred[ev.key]
        r = self.running.get(ev.key)
        if r is None or r.spec.attempt != ev.attempt:
            return []
        queued = self.slots.withdraw(ev.key)
        if queued is not None:
            failure = pm.Failure(
                category="UserError",
                code=r.cancel_code,
                message=f"task ended before it started: {ev.reason}",
            )
            return [self._unstarted(r.spec, queued[1], ev.now, failure)]
        r.cancelled = True
        r.cancel_reason = ev.reason
        return [KillProcess(ev.key)]

    def _run_finished(self, ev: RunFinished) -> list[Instruction]:
        run = self.running.pop(ev.key, None)
        if run is None:
            return []
        spec = run.spec
        failure = ev.failure
        if run.abandoned:
            failure = pm.Failure(
                category="ServerError",
                code=pm.AGENT_STOPPING,
                message="the agent stopped before the task finished",
            )
        deadline = ev.end_time + spec.retention_s
        self.retention[ev.key] = deadline
        out: list[Instruction] = [SaveRetention(ev.key, deadline)]
        deferred = self.deferred.pop(ev.key, None)
        if deferred is not None and self.tvm_name is not None:
            self.running[ev.key] = Run(deferred)
            self.slots.take(deferred)  # takes the slots of the run it replaces
            out.append(StartRun(deferred))
        out.extend(StartRun(w) for w in self.slots.release(spec))
        self.acked(ev.peer_acked)
        out.append(
            SendCompletion(
                pm.TaskCompleted(
                    key=ev.key,
                    attempt=spec.attempt,
                    exit_code=ev.exit_code,
                    start_time=ev.start_time,
                    end_time=ev.end_time,
                    failure=failure,
                    uploaded=ev.uploaded,
                )
            )
        )
        return out

    def _completion_queued(self, ev: CompletionQueued) -> list[Instruction]:
        self.unacked_done[ev.key] = (ev.attempt, ev.seq)
        return []

    def _session_restarted(self, ev: SessionRestarted) -> list[Instruction]:
        self.acked(ev.peer_acked)
        self.unacked_done = {k: (a, seq - ev.shift) for k, (a, seq) in self.unacked_done.items()}
        return []

    def _tvm_op(self, ev: TvmOpReceived) -> list[Instruction]:
        out: list[Instruction] = []
        msg = ev.msg
        if isinstance(msg, (pm.LeavePool, pm.RebootTvm)):
            r = self.start_run
            if r is not None and self.tvm_name is not None and self.tvm_name == msg.tvm_name:
                r.cancelled = True
                r.cancel_reason = "TVM rebooted or removed"
                out.append(KillStartTask())
        out.append(QueueTvmOp(msg))
        return out

    def _tvm_set_up(self, ev: TvmSetUp) -> list[Instruction]:
        self.tvm_name = ev.tvm_name
        self.slots.capacity = ev.slots if self.slots.counted else 0
        return []

    def _kill_all(self, reason: str, abandon: bool = False) -> list[Instruction]:
        out: list[Instruction] = self._hand_back_waiting(reason, abandon)
        for key, r in self.running.items():
            r.cancelled = True
            r.cancel_reason = reason
            r.abandoned = r.abandoned or abandon
            out.append(KillProcess(key))
        return out

    def _wipe_started(self, ev: WipeStarted) -> list[Instruction]:
        self.deferred.clear()
        return self._kill_all("TVM removed")

    def _hand_back_waiting(self, reason: str, abandon: bool = True) -> list[Instruction]:
        """Answer every waiting task unstarted: requeued by the coordinator (AgentStopping) when
        `abandon`, else ended like a killed run (the coordinator requeues those it moved itself)."""
        out: list[Instruction] = []
        for spec, since in self.slots.clear():
            code = pm.AGENT_STOPPING if abandon else self.running[spec.key].cancel_code
            failure = pm.Failure(
                category="ServerError" if abandon else "UserError",
                code=code,
                message=f"task ended before it started: {reason}",
            )
            out.append(self._unstarted(spec, since, since, failure))
        return out

    def _welcomed(self, ev: Welcomed) -> list[Instruction]:
        # Slots are kept only for a coordinator that says what each run takes (TaskSpec.slots);
        # the next JoinPool sets them (a join always follows the welcome of its link).
        self.slots.counted = ev.minor >= pm.QUEUE_MINOR
        if self.slots.counted:
            return []
        self.slots.capacity = 0
        out: list[Instruction] = []
        for spec, _ in self.slots.clear():  # nothing waits for an older coordinator
            self.slots.take(spec)
            out.append(StartRun(spec))
        return out

    def _queue_tick(self, ev: QueueTick) -> list[Instruction]:
        out: list[Instruction] = []
        for spec, since in self.slots.overdue(ev.now):
            failure = pm.Failure(
                category="ServerError",
                code=pm.QUEUE_HANDED_BACK,
                message=f"waited {WAIT_S:g} s for a slot of this TVM: handed back unstarted",
            )
            out.append(self._unstarted(spec, since, ev.now, failure))
        return out

    def _wiped(self, ev: TvmWiped) -> list[Instruction]:
        self.tvm_name = None
        self.slots.capacity = 0
        self.retention.clear()
        return []

    def _reboot(self, ev: RebootStarted) -> list[Instruction]:
        return self._kill_all("TVM rebooting")

    def _reimaged(self, ev: Reimaged) -> list[Instruction]:
        self.retention.clear()
        return []

    def _start_began(self, ev: StartTaskBegan) -> list[Instruction]:
        self.start_run = ev.run
        return []

    def _start_ended(self, ev: StartTaskEnded) -> list[Instruction]:
        if self.start_run is ev.run:
            self.start_run = None
        return []

    def _drain_started(self, ev: DrainStarted) -> list[Instruction]:
        self.draining = True
        # What waits has not started: the coordinator places it elsewhere at once.
        return [
            *self._hand_back_waiting("the agent is stopping"),
            Send(pm.Draining(reason="agent stopping")),
        ]

    def _drain_over(self, ev: DrainGraceOver) -> list[Instruction]:
        return self._kill_all("agent stopped", abandon=True)

    def _retention_loaded(self, ev: RetentionLoaded) -> list[Instruction]:
        for key, deadline in ev.deadlines.items():
            self.retention.setdefault(key, deadline)
        return []

    def _retention_sweep(self, ev: RetentionSweep) -> list[Instruction]:
        out: list[Instruction] = []
        for key, deadline in list(self.retention.items()):
            if deadline <= ev.now and key not in self.running:
                del self.retention[key]
                out.append(DeleteTaskFiles(key, cleaned=True))
        return out

    def _delete_files(self, ev: DeleteFilesReceived) -> list[Instruction]:
        out: list[Instruction] = []
        r = self.running.get(ev.key)
        queued = self.slots.withdraw(ev.key) if r is not None else None
        if r is not None and queued is not None:
            failure = pm.Failure(
                category="UserError", code=r.cancel_code, message="task deleted before it started"
            )
            out.append(self._unstarted(r.spec, queued[1], queued[1], failure))
        elif r is not None:
            r.cancelled = True
            out.append(KillProcess(ev.key))
        self.retention.pop(ev.key, None)  # deleted: nothing left for the sweep to do
        out.append(DeleteTaskFiles(ev.key, cleaned=False))
        return out

    def _disk_measured(self, ev: DiskMeasured) -> list[Instruction]:
        usage = ev.usage
        total = sum(usage.values())
        if not ev.limit_bytes or total <= ev.limit_bytes or not usage:
            return []
        key = max(usage, key=lambda k: usage[k])
        r = self.running.get(key)
        if r is None or r.cancelled:
            return []
        r.cancelled = True
        r.cancel_code = DISK_LIMIT_CODE
        r.cancel_reason = disk_message(ev.limit_bytes, total, usage[key])
        return [Warn(f"task {key} killed: {r.cancel_reason}"), KillProcess(key)]


def disk_message(limit: int, total: int, own: int) -> str:
    return (
        f"the TVM's disk limit of {limit >> 20} MiB for running tasks was exceeded ({total >> 20} MiB in use, "
        f"{own >> 20} MiB by this task)"
    )


_HANDLERS = {
    RunTaskReceived: AgentState._run_task,
    CancelReceived: AgentState._cancel,
    RunFinished: AgentState._run_finished,
    CompletionQueued: AgentState._completion_queued,
    SessionRestarted: AgentState._session_restarted,
    TvmOpReceived: AgentState._tvm_op,
    TvmSetUp: AgentState._tvm_set_up,
    WipeStarted: AgentState._wipe_started,
    TvmWiped: AgentState._wiped,
    RebootStarted: AgentState._reboot,
    Reimaged: AgentState._reimaged,
    StartTaskBegan: AgentState._start_began,
    StartTaskEnded: AgentState._start_ended,
    DrainStarted: AgentState._drain_started,
    DrainGraceOver: AgentState._drain_over,
    RetentionLoaded: AgentState._retention_loaded,
    RetentionSweep: AgentState._retention_sweep,
    DeleteFilesReceived: AgentState._delete_files,
    DiskMeasured: AgentState._disk_measured,
    QueueTick: AgentState._queue_tick,
    Welcomed: AgentState._welcomed,
}
