"""Tasks on TVMs: starting, stopping, requeueing and ending a run, and TVM state changes.

The lowest area: every other one that moves a task on or off a TVM comes through here.
"""

from __future__ import annotations

from protocol import messages as pm

from .instructions import ENCODER, Outbox, Write
from .multi import Gangs
from .records import (
    ACTIVE,
    COMPLETED,
    RUNNING,
    TASK_DONE,
    Job,
    TaskDone,
    TaskRec,
    Tvm,
    modern_job_id,
)
from .specs import DEFAULT_RETENTION_S, WALL_CLOCK_EXIT_CODE, resource_file
from .states import TvmState, move_task, move_tvm
from .store import Store
from .taskextras import output_specs

_BUSY_OR_IDLE = ("idle", "running")


class Runs:
    def __init__(self, store: Store, out: Outbox) -> None:
        self.s = store
        self.out = out
        self.gangs = Gangs(store, out, self)  # multi-instance tasks' instances

    def put_task(self, job: Job, task: TaskRec) -> None:
        # Once or twice per task: the journal write is built here rather than through Outbox.put.
        key = f"{job.rec.workitem}/{job.rec.name}/{task.name}"
        writes = self.out.fx.writes
        writes.append(Write("task", key, ENCODER.encode(task)))
        if task.exit_code is not None:  # a completion was recorded: its delta row is superseded
            writes.append(Write(TASK_DONE, key, None))

    def put_task_done(self, key: str, task: TaskRec) -> None:
        """Journal a recorded completion (finished, or back in the queue for a retry) as a small
        delta row rather than the whole task."""
        self.out.fx.writes.append(Write(TASK_DONE, key, ENCODER.encode(TaskDone.of(task))))

    def set_tvm_state(self, tvm: Tvm, state: TvmState) -> None:
        if tvm.rec.state != state:
            old = move_tvm(tvm.rec, state)
            tvm.rec.state_time = self.s.clock()
            # idle <-> running follows from the running tasks, which are not journaled either:
            # restore derives it (Store.restore, Agents.hello), so a flip costs no journal row.
            if not (old in _BUSY_OR_IDLE and state in _BUSY_OR_IDLE):
                self.out.put("tvm", tvm.rec.name, tvm.rec)

    def jm_env(self, job: Job) -> dict[str, str]:
        """What a job manager needs to call the service for its own job."""
        return {
            "TVM_ENDPOINT": self.s.account_url,
            "TVM_ACCOUNT": self.s.account,
            "TVM_JOB_TOKEN": job.rec.token,
            # The same credential where Azure Batch puts a job-scoped token
            # (authenticationTokenSettings access ["job"]): Azure SDKs send it as a Bearer token.
            "AZ_BATCH_AUTHENTICATION_TOKEN": job.rec.token,
            "TVM_WORKITEM_NAME": job.rec.workitem,
            "TVM_JOB_NAME": job.rec.name,
        }

    def start(self, job: Job, task: TaskRec, tvm: Tvm) -> None:
        s = self.s
        s.attempts += 1
        task.attempt = (s.epoch << 32) | s.attempts
        move_task(task, RUNNING, job.tally)
        task.prev_state = ACTIVE
        task.state_time = s.clock()
        task.tvm = tvm.rec.name
        task.pool = tvm.rec.pool
        task.start_time = None
        key = f"{job.key}/{task.name}"
        tvm.running[key] = task
        if tvm.rec.state == "idle":
            move_tvm(tvm.rec, "running")
            tvm.rec.state_time = task.state_time
        rec = job.rec
        # The job's or the task's dict as it is when only one has variables (the spec only reads it).
        env = rec.common_env
        if task.env:
            env = {**env, **task.env} if env else task.env
        if task.job_manager:
            env = {**env, **self.jm_env(job)}  # endpoint + job-scoped credential
        wall = task.max_wall_s if task.max_wall_s is not None else rec.max_wall_s
        # AZ_BATCH_JOB_ID: the workitem's name (the agent's default) unless a schedule made the job.
        wi = s.workitems.get(rec.workitem)
        job_id = (
            ""
            if wi is not None and wi.spec.schedule is None
            else modern_job_id(rec.workitem, rec.name, True)
        )
        if (
            wall
            or task.resource_files
            or task.retention_s is not None
            or task.run_elevated
            or task.job_manager
            or rec.prep is not None
            or task.output_files
            or task.slots != 1
        ):
            spec = pm.TaskSpec(
                key=key,
                attempt=task.attempt,
                command_line=task.command_line,
                workitem=rec.workitem,
                job=rec.name,
                task=task.name,
                env=env,
                resource_files=[resource_file(r) for r in task.resource_files]
                if task.resource_files
                else [],
                max_wall_clock_s=wall or 0.0,
                retention_s=task.retention_s
                if task.retention_s is not None
                else DEFAULT_RETENTION_S,
                run_elevated=task.run_elevated,
                job_manager=task.job_manager,
                job_id=job_id,
                job_prep=rec.prep.name if rec.prep is not None else "",
                output_files=output_specs(task.output_files) if task.output_files else [],
                slots=task.slots,
            )
        else:
            # The common task, once per placement: the fields at their defaults are left to them
            # (the encoder leaves them out either way).
            spec = pm.TaskSpec(
                key=key,
                attempt=task.attempt,
                command_line=task.command_line,
                workitem=rec.workitem,
                job=rec.name,
                task=task.name,
                env=env,
                job_id=job_id,
            )
        self.out.send(tvm.rec.agent_id, pm.RunTask(spec=spec))

    def off_tvm(self, task_key: str, task: TaskRec) -> Tvm | None:
        """Take a running task off its TVM's books (an idle TVM goes idle); returns the TVM."""
        holder = self.s.tvms.get(task.tvm or "")
        if holder is not None:
            holder.running.pop(task_key, None)
            if not holder.running and holder.rec.state == "running":
                self.set_tvm_state(holder, "idle")
        return holder

    def release(self, job: Job, task: TaskRec, reason: str) -> None:
        """Stop a running task on its TVM (the agent kills the tree)."""
        if task.state != RUNNING or not task.tvm:
            return
        if task.multi is not None and self.gangs.end(f"{job.key}/{task.name}", reason):
            return
        tvm = self.s.tvms.get(task.tvm)
        key = f"{job.key}/{task.name}"
        if tvm is not None:
            tvm.running.pop(key, None)
            self.out.send(
                tvm.rec.agent_id, pm.CancelTask(key=key, attempt=task.attempt, reason=reason)
            )
            if not tvm.running and tvm.rec.state == "running":
                self.set_tvm_state(tvm, "idle")

    def requeue(self, job: Job, task: TaskRec) -> None:
        """A running task goes back to the front of its job's queue: requeueCount+1, retryCount
        unchanged (its TVM was lost, removed or rebooted, or its slot went to a job manager)."""
        now = self.s.clock()
        move_task(task, ACTIVE, job.tally)
        task.prev_state = RUNNING
        task.state_time = now
        task.requeue_count += 1
        task.last_requeue = now
        task.tvm = None
        job.queue.appendleft(task)
        self.put_task(job, task)

    def requeue_running(self, job: Job, task: TaskRec, reason: str) -> None:
        """Stop a running task and put it back at the front of its job's queue (requeueCount++)."""
        self.release(job, task, reason)
        self.requeue(job, task)

    def requeue_tvm_tasks(self, tvm: Tvm) -> None:
        for key, task in list(tvm.running.items()):
            job = self.s.job_of(key)
            if job is not None and task.state == RUNNING:
                if task.multi is not None:  # one TVM lost: the whole gang runs again
                    self.gangs.end(f"{job.key}/{task.name}", "a TVM of the task was lost")
                self.requeue(job, task)
        tvm.running.clear()

    def end_running(self, job: Job, task: TaskRec, now: float, why: str) -> None:
        """Kill a running task because its job ended or was disabled: it completes with a failure."""
        self.release(job, task, "job ended")
        if task.exit_code is None:
            task.exit_code = WALL_CLOCK_EXIT_CODE
        task.failure = ("ServerError", "TaskEnded", why)  # before the move: the tally reads it
        task.prev_state = move_task(task, COMPLETED, job.tally)
        task.state_time = task.end_time = now
        self.put_task(job, task)

    def forget_task(self, job: Job, task: TaskRec) -> None:
        """Before a task (or its job) is deleted: stop it and have its TVM delete its files."""
        self.release(job, task, "deleted")
        where = task.tvm and self.s.tvms.get(task.tvm)
        if where:
            self.out.send(where.rec.agent_id, pm.DeleteTaskFiles(key=f"{job.key}/{task.name}"))
