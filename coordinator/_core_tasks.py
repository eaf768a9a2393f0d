"""Tasks, placement and task counts (part of the pure core)."""

from __future__ import annotations

import re

from protocol import messages as pm
from protocol.paths import validate_relative_path

from . import models as m
from ._core_base import DEFAULT_RETENTION_S, MAX_COLLECTION, WALL_CLOCK_EXIT_CODE, CoreBase
from .errors import ApiError, bad_request, conflict, not_found
from .placement import place
from .records import (
    ACTIVE,
    COMPLETED,
    RUNNING,
    Job,
    TaskRec,
    Tvm,
)
from .timeutil import parse_duration
from .validation import check_env, check_name, check_range

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class TasksMixin(CoreBase):
    # ------------------------------------------------------------------ tasks

    def _check_files(self, files: list[m.ResourceFile], field: str) -> None:
        for i, rf in enumerate(files):
            try:
                validate_relative_path(rf.file_path)
            except ValueError as exc:
                raise bad_request("InvalidResourceFilePath", f"{field}[{i}].filePath: {exc}",
                                  field=f"{field}[{i}].filePath") from None
            src = rf.blob_source
            store = src.startswith("filestore:sha256:")
            if not (src.startswith(("http://", "https://")) or store) or (
                    store and not _SHA256.fullmatch(src[len("filestore:sha256:"):])):
                raise bad_request("InvalidResourceFileSource",
                                  f"{field}[{i}].blobSource must be an http(s) URL or filestore:sha256:<64 hex>",
                                  field=f"{field}[{i}].blobSource")
            if rf.sha256 is not None and not _SHA256.fullmatch(rf.sha256):
                raise bad_request("InvalidPropertyValue", f"{field}[{i}].sha256 must be 64 hex digits",
                                  field=f"{field}[{i}].sha256")
            if rf.file_size is not None and rf.file_size < 0:
                raise bad_request("InvalidPropertyValue", f"{field}[{i}].fileSize must not be negative",
                                  field=f"{field}[{i}].fileSize")

    def _new_task(self, job: Job, req: m.TaskAdd, now: float) -> TaskRec:
        check_name(req.name)
        if not req.command_line.strip():
            raise bad_request("MissingRequiredProperty", "commandLine must not be empty", field="commandLine")
        env = check_env(req.environment_settings, "environmentSettings")
        self._check_files(req.resource_files, "resourceFiles")
        max_wall = max_retries = retention = None
        c = req.task_constraints
        if c is not None:
            max_wall, max_retries, retention = self._constraints(c)
        self._seq += 1
        return TaskRec(name=req.name, command_line=req.command_line, seq=self._seq, created=now,
                       state_time=now, env=env or None, resource_files=list(req.resource_files) or None,
                       max_wall_s=max_wall, max_retries=max_retries, retention_s=retention,
                       run_elevated=req.run_elevated)

    def _constraints(self, c: m.TaskConstraints) -> tuple[float | None, int | None, float | None]:
        max_wall = parse_duration(c.max_wall_clock_time, "taskConstraints.maxWallClockTime") \
            if c.max_wall_clock_time else None
        max_retries = None
        if c.max_task_retry_count is not None:
            max_retries = check_range(c.max_task_retry_count, -1, 10**6, "taskConstraints.maxTaskRetryCount")
        retention = parse_duration(c.retention_time, "taskConstraints.retentionTime") if c.retention_time else None
        return max_wall, max_retries, retention

    def _job_for_add(self, workitem: str, job_name: str) -> Job:
        job = self.get_job(workitem, job_name)
        self._check_job_accepts_tasks(job)  # issue 6 (_core_jobs): 409 JobCompleted / JobBeingTerminated
        return job

    def add_task(self, workitem: str, job_name: str, req: m.TaskAdd) -> None:
        job = self._job_for_add(workitem, job_name)
        if req.name in job.tasks:
            raise conflict("task", req.name)
        task = self._new_task(job, req, self.clock())
        self._insert(job, task)

    def add_tasks(self, workitem: str, job_name: str, reqs: list[m.TaskAdd]) -> list[m.TaskAddResult]:
        job = self._job_for_add(workitem, job_name)
        if len(reqs) > MAX_COLLECTION:
            raise bad_request("TooManyTasks", f"a collection holds at most {MAX_COLLECTION} tasks, got {len(reqs)}",
                              count=len(reqs))
        now = self.clock()
        results: list[m.TaskAddResult] = []
        seen: set[str] = set()
        for req in reqs:
            try:
                if req.name in job.tasks or req.name in seen:
                    raise conflict("task", req.name)
                task = self._new_task(job, req, now)
            except ApiError as exc:
                results.append(m.TaskAddResult(name=req.name, status="clienterror", error={
                    "code": exc.code, "message": {"lang": "en-us", "value": exc.message}}))
                continue
            seen.add(req.name)
            self._insert(job, task)
            results.append(m.TaskAddResult(name=req.name, status="success"))
        return results

    def _insert(self, job: Job, task: TaskRec) -> None:
        job.tasks[task.name] = task
        job.queue.append(task)
        self._put_task(job, task)

    def get_task(self, workitem: str, job_name: str, name: str) -> tuple[Job, TaskRec]:
        job = self.get_job(workitem, job_name)
        task = job.tasks.get(name)
        if task is None:
            raise not_found("task", name)
        return job, task

    def update_task(self, workitem: str, job_name: str, name: str, req: m.TaskUpdate) -> None:
        job, task = self.get_task(workitem, job_name, name)
        if req.task_constraints is not None:
            max_wall, max_retries, retention = self._constraints(req.task_constraints)
            if req.task_constraints.max_wall_clock_time is not None:
                task.max_wall_s = max_wall
            if req.task_constraints.max_task_retry_count is not None:
                task.max_retries = max_retries
            if req.task_constraints.retention_time is not None:
                task.retention_s = retention
        self._put_task(job, task)

    def terminate_task(self, workitem: str, job_name: str, name: str) -> None:
        job, task = self.get_task(workitem, job_name, name)
        if task.state == COMPLETED:
            return
        now = self.clock()
        self._release(job, task, "terminated")
        task.prev_state = task.state
        task.state = COMPLETED
        task.state_time = now
        task.end_time = now
        task.failure = ("UserError", "TaskEnded", "The task was terminated by the user")
        if task.exit_code is None and task.prev_state == RUNNING:
            task.exit_code = WALL_CLOCK_EXIT_CODE
        self._put_task(job, task)

    def delete_task(self, workitem: str, job_name: str, name: str) -> None:
        job, task = self.get_task(workitem, job_name, name)
        self._forget_task(job, task)
        del job.tasks[name]
        self._delete("task", f"{job.key}/{name}")

    def _forget_task(self, job: Job, task: TaskRec) -> None:
        self._release(job, task, "deleted")
        where = task.tvm and self.tvms.get(task.tvm)
        if where:
            self._send(where.rec.agent_id, pm.DeleteTaskFiles(key=f"{job.key}/{task.name}"))

    def _release(self, job: Job, task: TaskRec, reason: str) -> None:
        """Stop a running task on its TVM (the agent kills the tree)."""
        if task.state != RUNNING or not task.tvm:
            return
        tvm = self.tvms.get(task.tvm)
        key = f"{job.key}/{task.name}"
        if tvm is not None:
            tvm.running.pop(key, None)
            self._send(tvm.rec.agent_id, pm.CancelTask(key=key, attempt=task.attempt, reason=reason))
            if not tvm.running and tvm.rec.state == "running":
                self._set_tvm_state(tvm, "idle")

    def _lookup(self, key: str) -> tuple[Job | None, TaskRec | None]:
        job_key, _, name = key.rpartition("/")
        job = self.jobs.get(job_key)
        if job is None:
            return None, None
        return job, job.tasks.get(name)

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> int:
        """Place what can be placed now; returns the number of tasks placed."""
        if self.recovering_until is not None:
            return 0
        placed = self._place_job_managers()  # issue 6: job managers go first
        by_pool: dict[str, list[Job]] = {}
        for job in self.jobs.values():
            if job.queue and job.rec.state == "active" and not self._jm_pending(job):
                by_pool.setdefault(job.rec.pool, []).append(job)
        for pool_name, jobs in by_pool.items():
            pool = self.pools.get(pool_name)
            if pool is None or pool.state != "active":
                continue
            tvms = [
                t for t in self.tvms.values()
                if t.rec.pool == pool_name and t.rec.state in ("idle", "running")
                and t.rec.scheduling == "enabled" and t.free > 0
                and (a := self.agents.get(t.rec.agent_id)) is not None and a.connected
                and not self._exclusive_held(t)
            ]
            for job, task, tvm in place(tvms, jobs, pool.spec.tvm_fill_type):
                self._start(job, task, tvm)
                job.served = self._attempts  # issue 6: fairness between equal-priority jobs
                placed += 1
        self.placements += placed
        return placed

    def _start(self, job: Job, task: TaskRec, tvm: Tvm) -> None:
        self._attempts += 1
        task.attempt = (self.epoch << 32) | self._attempts
        task.state = RUNNING
        task.prev_state = ACTIVE
        task.state_time = self.clock()
        task.tvm = tvm.rec.name
        task.pool = tvm.rec.pool
        task.start_time = None
        key = f"{job.key}/{task.name}"
        tvm.running[key] = task
        if tvm.rec.state == "idle":
            tvm.rec.state = "running"
            tvm.rec.state_time = task.state_time
        env = dict(job.rec.common_env)
        if task.env:
            env.update(task.env)
        if task.job_manager:
            env.update(self._jm_env(job))  # issue 6: endpoint + job-scoped credential
        wall = task.max_wall_s if task.max_wall_s is not None else job.rec.max_wall_s
        spec = pm.TaskSpec(
            key=key, attempt=task.attempt, command_line=task.command_line, workitem=job.rec.workitem,
            job=job.rec.name, task=task.name, env=env,
            resource_files=[self._rf(r) for r in task.resource_files] if task.resource_files else [],
            max_wall_clock_s=wall or 0.0,
            retention_s=task.retention_s if task.retention_s is not None else DEFAULT_RETENTION_S,
            run_elevated=task.run_elevated, job_manager=task.job_manager,
        )
        self._send(tvm.rec.agent_id, pm.RunTask(spec=spec))

    def _rf(self, r: m.ResourceFile) -> pm.ResourceFile:
        return pm.ResourceFile(url=r.blob_source, file_path=r.file_path, sha256=r.sha256 or "",
                               size=r.file_size if r.file_size is not None else -1)

    # ------------------------------------------------------------------ counts

    def task_counts(self, job: Job) -> m.TaskCounts:
        c = m.TaskCounts()
        for t in job.tasks.values():
            if t.state == ACTIVE:
                c.active += 1
            elif t.state == RUNNING:
                c.running += 1
            else:
                c.completed += 1
                if t.exit_code == 0 and t.failure is None:
                    c.succeeded += 1
                else:
                    c.failed += 1
        return c
