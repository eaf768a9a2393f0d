"""Multi-instance tasks (Azure's `multiInstanceSettings`): one task on N TVMs at once.

A gang is placed all or none (`slotplace.place_wide` finds N whole TVMs). Instance i runs the
coordination command on the i-th TVM under the key `<task key>~i` (`~` is never in a name), holding
that TVM's slot until the gang ends; instance 0's TVM is the primary. Once every coordination
command has started, the primary gets the application command under the task's own key: its
completion is the task's (recorded by `Tasks.task_completed` as for any task), and ends the gang:
every instance still running is cancelled and its slot freed. A coordination command that fails
while the gang runs fails the task (`SubtaskFailed`, the instance and TVM named), the other
instances are cancelled; terminating, deleting or requeueing the task, or losing any of its TVMs,
stops them all. Every instance sees the hosts (`AZ_BATCH_HOST_LIST`, `AZ_BATCH_NODE_LIST`,
`AZ_BATCH_MASTER_NODE`, `AZ_BATCH_IS_CURRENT_NODE_MASTER`) and, since TVMs sharing a host share its
address, each instance's port range (`TVM_HOST_PORT_LIST`: `ip:low-high`, by instance).

Gangs live in memory only, like placements: after a coordinator restart the task is queued again and
its instances still running are cancelled when their agents report them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from protocol import messages as pm

from .instructions import Outbox, Send
from .records import Job, TaskRec, Tvm
from .specs import resource_file
from .store import Store

SUBTASK_FAILED = "SubtaskFailed"
MAX_INSTANCES = 100


@dataclass
class Sub:
    """One instance: its TVM and how its coordination command is doing."""

    tvm: str
    agent_id: str
    state: str = "running"  # running | completed
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    failure: tuple[str, str, str] | None = None


@dataclass
class Gang:
    job: Job
    task: TaskRec
    attempt: int
    subs: list[Sub]
    app: pm.TaskSpec | None  # the primary's RunTask until it is sent
    app_agent: str
    started: set[int] = field(default_factory=set)


def sub_key(key: str, i: int) -> str:
    return f"{key}~{i}"


def split_sub(key: str) -> tuple[str, int] | None:
    base, sep, idx = key.rpartition("~")
    return (base, int(idx)) if sep and idx.isdigit() else None


class Gangs:
    def __init__(self, store: Store, out: Outbox, runs: Any) -> None:  # runs: a runs.Runs
        self.s = store
        self.out = out
        self.runs = runs
        self.gangs: dict[str, Gang] = {}  # task key -> its running gang
        self.last: dict[str, list[Sub]] = {}  # task key -> its latest instances (views)

    def start(self, job: Job, task: TaskRec, tvms: list[Tvm]) -> None:
        """Place `task` on `tvms` (tvms[0] the primary): the coordination commands go out now."""
        assert task.multi is not None
        primary = tvms[0]
        key = f"{job.key}/{task.name}"
        # The ordinary start (attempt, state, the spec with its environment), whose RunTask is held
        # back until the coordination commands run, and whose slot is the primary's instance's.
        self.runs.start(job, task, primary)
        sent = self.out.fx.sends.pop()
        assert isinstance(sent, Send)
        assert isinstance(sent.msg, pm.RunTask)
        del primary.running[key]
        hosts = [t.rec.ip or "127.0.0.1" for t in tvms]
        ports = ",".join(
            f"{h}:{t.rec.port_low}-{t.rec.port_high}" for h, t in zip(hosts, tvms, strict=True)
        )
        common_env = {
            "AZ_BATCH_HOST_LIST": ",".join(hosts),
            "AZ_BATCH_NODE_LIST": ";".join(hosts),
            "AZ_BATCH_MASTER_NODE": f"{hosts[0]}:{primary.rec.port_low}",
            "TVM_HOST_PORT_LIST": ports,
            "TVM_NUMBER_OF_INSTANCES": str(len(tvms)),
            "AZ_BATCH_TASK_ID": task.name,
        }
        common = [resource_file(r) for r in task.multi.common_resource_files]
        spec = sent.msg.spec
        gang = Gang(job, task, task.attempt, [], None, primary.rec.agent_id)
        for i, tvm in enumerate(tvms):
            tvm.running[sub_key(key, i)] = task
            if tvm.rec.state == "idle":
                self.runs.set_tvm_state(tvm, "running")
            gang.subs.append(Sub(tvm.rec.name, tvm.rec.agent_id))
            env = {
                **common_env,
                "AZ_BATCH_IS_CURRENT_NODE_MASTER": "true" if i == 0 else "false",
                "TVM_INSTANCE_INDEX": str(i),
            }
            sub = msgspec.structs.replace(
                spec,
                key=sub_key(key, i),
                task=f"{task.name}~{i}",  # its own directory and cgroup beside the primary's
                command_line=task.multi.coordination_command_line or "",
                resource_files=common,
                output_files=[],
                system_env=env,
                max_wall_clock_s=0.0,  # it lives as long as the gang
                slots=0,  # the gang's slots are the coordinator's to count: it never waits
            )
            self.out.send(tvm.rec.agent_id, pm.RunTask(spec=sub))
        gang.app = msgspec.structs.replace(
            spec,
            slots=0,  # beside its TVM's instance, in the same slots
            resource_files=[*spec.resource_files, *common],
            system_env={
                **common_env,
                "AZ_BATCH_IS_CURRENT_NODE_MASTER": "true",
                "TVM_INSTANCE_INDEX": "0",
            },
        )
        self.gangs[key] = gang
        self.last[key] = gang.subs

    # ------------------------------------------------------------------ agent messages

    def _gang_of(self, key: str, attempt: int) -> tuple[Gang, int] | None:
        parsed = split_sub(key)
        if parsed is None:
            return None
        gang = self.gangs.get(parsed[0])
        if gang is None or gang.attempt != attempt or parsed[1] >= len(gang.subs):
            return None
        return gang, parsed[1]

    def sub_started(self, msg: pm.TaskStarted) -> None:
        found = self._gang_of(msg.key, msg.attempt)
        if found is not None:
            gang, i = found
            gang.subs[i].start_time = msg.start_time
            self._started(gang, i)

    def _started(self, gang: Gang, i: int) -> None:
        gang.started.add(i)
        if gang.app is not None and len(gang.started) == len(gang.subs):
            self.out.send(gang.app_agent, pm.RunTask(spec=gang.app))
            gang.app = None

    def sub_completed(self, msg: pm.TaskCompleted) -> pm.TaskCompleted | None:
        """Record an instance's end; a failed one fails the task: the completion to record then."""
        found = self._gang_of(msg.key, msg.attempt)
        if found is None:
            return None
        gang, i = found
        sub = gang.subs[i]
        sub.state = "completed"
        sub.start_time = msg.start_time
        sub.end_time = msg.end_time
        sub.exit_code = msg.exit_code
        f = msg.failure
        sub.failure = (f.category, f.code, f.message) if f else None
        if msg.exit_code == 0 and f is None:
            self._started(gang, i)  # a quick coordination command: started (and done) all the same
            return None  # its slot stays the gang's until the application command ends
        key = f"{gang.job.key}/{gang.task.name}"
        if f is not None and f.code in (
            pm.AGENT_STOPPING,
            pm.QUEUE_HANDED_BACK,
        ):  # not the task's fault: run it again
            return pm.TaskCompleted(
                key=key,
                attempt=gang.attempt,
                exit_code=msg.exit_code,
                start_time=msg.start_time,
                end_time=msg.end_time,
                failure=f,
            )
        why = f.message if f else f"exit code {msg.exit_code}"
        return pm.TaskCompleted(
            key=key,
            attempt=gang.attempt,
            exit_code=msg.exit_code,
            start_time=gang.subs[0].start_time or msg.start_time,
            end_time=msg.end_time,
            failure=pm.Failure(
                category="UserError",
                code=SUBTASK_FAILED,
                message=f"instance {i} (TVM {sub.tvm}) of the multi-instance task failed: {why}",
            ),
        )

    def app_completed(self, msg: pm.TaskCompleted) -> None:
        """The application command ended (or a failed instance ended the task): before the task's
        completion is recorded, every instance still running is stopped and its slot freed."""
        gang = self.gangs.get(msg.key)
        if gang is not None and gang.attempt == msg.attempt:
            self.end(msg.key, "the multi-instance task ended", cancel_app=False)

    # ------------------------------------------------------------------ ending

    def end(self, key: str, reason: str, cancel_app: bool = True) -> bool:
        """Stop the gang of task `key`: cancel its instances (and the application command), free
        their slots. False if it has none."""
        gang = self.gangs.pop(key, None)
        if gang is None:
            return False
        now = self.s.clock()
        for i, sub in enumerate(gang.subs):
            skey = sub_key(key, i)
            tvm = self.s.tvms.get(sub.tvm)
            if sub.state == "running":
                sub.state = "completed"
                sub.end_time = now
                sub.failure = ("UserError", "TaskEnded", reason)
                self.out.send(
                    sub.agent_id, pm.CancelTask(key=skey, attempt=gang.attempt, reason=reason)
                )
            if tvm is not None and tvm.running.pop(skey, None) is not None:
                if not tvm.running and tvm.rec.state == "running":
                    self.runs.set_tvm_state(tvm, "idle")
        if cancel_app and gang.app is None:  # it was sent
            self.out.send(
                gang.app_agent, pm.CancelTask(key=key, attempt=gang.attempt, reason=reason)
            )
        return True

    def owns(self, key: str, attempt: int, tvm: Tvm) -> bool:
        """An agent reports running `key`: is it an instance of a live gang, on that TVM?"""
        found = self._gang_of(key, attempt)
        return found is not None and found[0].subs[found[1]].tvm == tvm.rec.name
