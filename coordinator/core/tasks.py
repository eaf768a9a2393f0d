"""Tasks: adding, updating, terminating and deleting them, their completion, and task counts."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request, conflict
from coordinator.common.validation import check_env, check_name
from protocol import messages as pm

from . import taskextras
from .deps import Deps
from .instructions import Outbox
from .jobprep import check_task_name
from .jobs import Jobs
from .records import ACTIVE, COMPLETED, RUNNING, TASK_DONE, Job, TaskRec, Tvm
from .runs import Runs
from .specs import (
    MAX_COLLECTION,
    WALL_CLOCK_EXIT_CODE,
    check_affinity,
    check_files,
    task_constraints,
)
from .states import move_task
from .store import Store

# The weight of a completion's run time in its job's moving average (Job.run_s).
RUN_S_WEIGHT = 0.2


class Tasks:
    def __init__(self, store: Store, out: Outbox, runs: Runs, jobs: Jobs) -> None:
        self.s = store
        self.out = out
        self.runs = runs
        self.jobs = jobs
        self.deps = Deps(store, jobs)
        # (task key, TVM name, succeeded) for every run that ends on a TVM (healing.py).
        self.on_result: Callable[[str, str, bool], None] | None = None

    # ------------------------------------------------------------------ commands

    def _new_task(self, req: m.TaskAdd, now: float, job: Job) -> TaskRec:
        check_name(req.name)
        if not req.command_line.strip():
            raise bad_request(
                "MissingRequiredProperty", "commandLine must not be empty", field="commandLine"
            )
        # Skipped when empty (the common task): this runs once per task added.
        env = (
            check_env(req.environment_settings, "environmentSettings")
            if req.environment_settings
            else None
        )
        if req.resource_files:
            check_files(req.resource_files, "resourceFiles")
        max_wall = max_retries = retention = None
        c = req.task_constraints
        if c is not None:
            max_wall, max_retries, retention = task_constraints(c)
        self.s.seq += 1
        task = TaskRec(
            name=req.name,
            command_line=req.command_line,
            seq=self.s.seq,
            created=now,
            state_time=now,
            env=env or None,
            resource_files=list(req.resource_files) or None,
            max_wall_s=max_wall,
            max_retries=max_retries,
            retention_s=retention,
            run_elevated=req.run_elevated,
            depends_on=req.depends_on,
            exit_conditions=req.exit_conditions,
            affinity=check_affinity(req.affinity_id),
        )
        if req.output_files or req.required_slots != 1 or req.multi_instance_settings:
            taskextras.apply(self.s, job, task, req)
        return task

    def _job_for_add(self, workitem: str, job_name: str) -> Job:
        job = self.s.get_job(workitem, job_name)
        self.jobs.check_accepts_tasks(job)  # 409 JobCompleted / JobBeingTerminated
        return job

    def add_task(self, workitem: str, job_name: str, req: m.TaskAdd) -> None:
        job = self._job_for_add(workitem, job_name)
        if req.name in job.tasks:
            raise conflict("task", req.name)
        if len(job.tasks) >= self.s.max_tasks_per_job:
            raise self._full(job)
        if self.s.task_count >= self.s.max_tasks:
            raise self._all_full()
        if job.rec.prep is not None:
            check_task_name(job, req.name)
        task = self._new_task(req, self.s.clock(), job)
        if task.depends_on is not None or task.exit_conditions is not None:
            refused = self.deps.check(job, [task])
            if refused:
                raise refused[task.name]
        self._insert(job, task)

    def _full(self, job: Job) -> ApiError:
        limit = self.s.max_tasks_per_job
        return ApiError(
            409,
            "JobTaskQuotaReached",
            f"job {job.rec.workitem}/{job.rec.name} holds {len(job.tasks):,} tasks, the most this "
            f"coordinator allows in one job ({limit:,}: max-tasks-per-job in its configuration). "
            "Delete completed tasks, use another job, or raise the limit.",
            limit=limit,
        )

    def _all_full(self) -> ApiError:
        limit = self.s.max_tasks
        return ApiError(
            409,
            "TaskQuotaReached",
            f"the account's jobs hold {self.s.task_count:,} tasks, the most this coordinator "
            f"allows in all jobs together ({limit:,}: max-tasks in its configuration). Delete "
            "completed jobs or tasks, or raise the limit.",
            limit=limit,
        )

    def add_tasks(
        self, workitem: str, job_name: str, reqs: list[m.TaskAdd]
    ) -> list[m.TaskAddResult]:
        job = self._job_for_add(workitem, job_name)
        if len(reqs) > MAX_COLLECTION:
            raise bad_request(
                "TooManyTasks",
                f"a collection holds at most {MAX_COLLECTION} tasks, got {len(reqs)}",
                count=len(reqs),
            )
        now = self.s.clock()
        refused: dict[str, ApiError] = {}  # by name: what dependents of a refused task look up
        own: list[ApiError | TaskRec] = []  # per request, in order
        seen: set[str] = set()
        room = self.s.max_tasks_per_job - len(job.tasks)
        room_all = self.s.max_tasks - self.s.task_count
        for req in reqs:
            try:
                if req.name in job.tasks or req.name in seen:
                    raise conflict("task", req.name)
                if room <= 0:
                    raise self._full(job)
                if room_all <= 0:
                    raise self._all_full()
                room -= 1
                room_all -= 1
                if job.rec.prep is not None:
                    check_task_name(job, req.name)
                own.append(self._new_task(req, now, job))
            except ApiError as exc:
                if req.name not in seen and req.name not in job.tasks:
                    refused[req.name] = exc
                own.append(exc)
            seen.add(req.name)
        made = [t for t in own if isinstance(t, TaskRec)]
        if any(t.depends_on is not None or t.exit_conditions is not None for t in made):
            # Checked together: tasks of one collection may depend on each other.
            refused = self.deps.check(job, made, refused)
        results: list[m.TaskAddResult] = []
        for req, res in zip(reqs, own, strict=True):
            if isinstance(res, TaskRec):
                if res.name not in refused:
                    self._insert(job, res)
                    results.append(m.TaskAddResult(name=req.name, status="success"))
                    continue
                res = refused[res.name]
            results.append(
                m.TaskAddResult(
                    name=req.name,
                    status="clienterror",
                    error={"code": res.code, "message": {"lang": "en-us", "value": res.message}},
                )
            )
        return results

    def _insert(self, job: Job, task: TaskRec) -> None:
        old = job.tasks.get(task.name)
        if old is not None:  # reactivated: a fresh record replaces the completed one
            job.tally.remove(old)
        else:
            self.s.task_count += 1
        job.tasks[task.name] = task
        job.tally.add(task)
        if job.deps is not None:
            self.deps.inserted(job, task.name)
        if task.deps is None or self.deps.add(job, task):
            job.queue.append(task)
        self.runs.put_task(job, task)

    def update_task(self, workitem: str, job_name: str, name: str, req: m.TaskUpdate) -> None:
        job, task = self.s.get_task(workitem, job_name, name)
        if req.task_constraints is not None:
            max_wall, max_retries, retention = task_constraints(req.task_constraints)
            if req.task_constraints.max_wall_clock_time is not None:
                task.max_wall_s = max_wall
            if req.task_constraints.max_task_retry_count is not None:
                task.max_retries = max_retries
            if req.task_constraints.retention_time is not None:
                task.retention_s = retention
        self.runs.put_task(job, task)

    def terminate_task(self, workitem: str, job_name: str, name: str) -> None:
        job, task = self.s.get_task(workitem, job_name, name)
        if task.state == COMPLETED:
            return
        now = self.s.clock()
        self.runs.release(job, task, "terminated")
        # Its outcome before the move (the tally reads it).
        task.failure = ("UserError", "TaskEnded", "The task was terminated by the user")
        if task.exit_code is None and task.state == RUNNING:
            task.exit_code = WALL_CLOCK_EXIT_CODE
        task.prev_state = move_task(task, COMPLETED, job.tally)
        task.state_time = now
        task.end_time = now
        self.runs.put_task(job, task)
        if job.rec.uses_deps:
            self.deps.forget(job, name)
            self.deps.completed(job, task)

    def delete_task(self, workitem: str, job_name: str, name: str) -> None:
        job, task = self.s.get_task(workitem, job_name, name)
        self.runs.forget_task(job, task)
        del job.tasks[name]
        self.s.task_count -= 1
        job.tally.remove(task)
        self.deps.forget(job, name)
        self.deps.deleted(job, name)
        self.out.delete("task", f"{job.key}/{name}")
        self.out.delete(TASK_DONE, f"{job.key}/{name}")

    def reactivate_task(self, workitem: str, job_name: str, name: str) -> None:
        """Run a failed task again: a fresh record in its initial state replaces the completed one
        (retry count, exit code and failure cleared; its old files on the TVM deleted)."""
        job, task = self.s.get_task(workitem, job_name, name)
        if task.state != COMPLETED:
            raise ApiError(
                409,
                "TaskNotCompleted",
                f"task {name!r} is {task.state}; only a completed task that failed can be reactivated",
            )
        if task.exit_code == 0 and task.failure is None:
            raise ApiError(
                409,
                "TaskCompletedSuccessfully",
                f"task {name!r} succeeded; it cannot be reactivated",
            )
        self.jobs.check_accepts_tasks(job)  # 409 JobCompleted / JobBeingTerminated
        self.runs.forget_task(job, task)
        now = self.s.clock()
        fresh = msgspec.structs.replace(
            task,
            state=ACTIVE,
            state_time=now,
            prev_state=COMPLETED,
            start_time=None,
            end_time=None,
            exit_code=None,
            retry_count=0,
            last_retry=None,
            failure=None,
            pool=None,
            tvm=None,
            attempt=0,
            uploaded=None,
        )
        self.out.delete(TASK_DONE, f"{job.key}/{name}")  # the old completion's delta row
        self._insert(job, fresh)

    # ------------------------------------------------------------------ events

    def task_started(self, msg: pm.TaskStarted) -> None:
        _, task = self.s.lookup(msg.key)
        if task is not None and task.state == RUNNING and task.attempt == msg.attempt:
            task.start_time = msg.start_time

    def task_completed(self, msg: pm.TaskCompleted, now: float | None = None) -> None:
        """`now`: the clock as its caller read it for this message (one reading per message)."""
        s = self.s
        job, task = s.lookup(msg.key)
        if job is None or task is None or task.state == COMPLETED:
            return  # already recorded (resend after reconnect) or deleted: exactly once
        if task.state == RUNNING and task.attempt != msg.attempt:
            return  # a run we requeued elsewhere; its twin result is not ours
        if task.state == ACTIVE and (msg.attempt >> 32) >= s.epoch:
            return  # requeued in this run of the coordinator: the late result is ignored
        code = msg.failure.code if msg.failure is not None else ""
        if code in (pm.AGENT_STOPPING, pm.QUEUE_HANDED_BACK):
            # The agent gave this attempt up unstarted (shutting down, or it waited too long in the
            # agent's queue): not the task's fault, run it again.
            if task.state == RUNNING:
                self.runs.off_tvm(msg.key, task)
                self.runs.requeue(job, task)
            if code == pm.QUEUE_HANDED_BACK:  # a long task held it up: queue this job no more
                job.run_s = max(job.run_s, msg.end_time - msg.start_time)
                s.queue_handbacks += 1
            return
        if msg.failure is None and msg.end_time >= msg.start_time > 0:
            ran = msg.end_time - msg.start_time
            job.run_s = ran if job.run_s < 0 else job.run_s + (ran - job.run_s) * RUN_S_WEIGHT
        s.completions += 1
        holder: Tvm | None = s.tvms.get(task.tvm) if task.tvm else None
        if holder is not None:
            holder.running.pop(msg.key, None)
            holder.rec.total_run += 1
            holder.rec.total_succeeded += msg.exit_code == 0 and msg.failure is None
            if not holder.running and holder.rec.state == "running":
                self.runs.set_tvm_state(holder, "idle")
            if self.on_result is not None:
                self.on_result(msg.key, holder.rec.name, msg.exit_code == 0 and not msg.failure)
        if now is None:
            now = s.clock()
        task.start_time = msg.start_time
        task.exit_code = msg.exit_code
        if msg.uploaded or task.uploaded:  # this attempt's uploads replace an earlier one's
            task.uploaded = [(u.path, u.sha256, u.size) for u in msg.uploaded] or None
        failure = msg.failure
        max_retries = task.max_retries if task.max_retries is not None else job.rec.max_retries
        retry = (
            failure is None
            and msg.exit_code != 0
            and (max_retries == -1 or task.retry_count < max_retries)
            and job.rec.state == "active"
        )
        task.prev_state = task.state
        task.state_time = now
        if retry:
            move_task(task, ACTIVE, job.tally)
            task.retry_count += 1
            task.last_retry = now
            task.tvm = None
            job.queue.appendleft(task)
        else:
            task.end_time = msg.end_time
            task.failure = (failure.category, failure.code, failure.message) if failure else None
            move_task(task, COMPLETED, job.tally)  # after its outcome: the tally reads it
        self.runs.put_task_done(msg.key, task)
        if task.state == COMPLETED:
            if job.rec.uses_deps or task.exit_conditions or job.rec.on_task_failure != "noaction":
                self.deps.completed(job, task)  # dependents released; the task's jobAction
            self.jobs.task_done(job, task)  # job manager done / all tasks complete

    # ------------------------------------------------------------------ counts

    def task_counts(self, job: Job) -> m.TaskCounts:
        return job.tally.counts()  # kept as tasks change (tally.py)
