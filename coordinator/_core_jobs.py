"""Workitems and jobs (part of the pure core)."""

from __future__ import annotations

from . import models as m
from ._core_base import CoreBase
from .errors import bad_request, conflict, not_found
from .records import (
    Job,
    JobRec,
    WorkitemRec,
)
from .timeutil import parse_duration
from .validation import check_env, check_name, check_range


class JobsMixin(CoreBase):
    # ------------------------------------------------------------------ workitems and jobs

    def add_workitem(self, req: m.WorkitemAdd) -> None:
        check_name(req.name)
        if req.name.lower() in (n.lower() for n in self.workitems):
            raise conflict("workitem", req.name)
        env = req.job_execution_environment
        if not env.pool_name:
            raise bad_request("MissingRequiredProperty", "jobExecutionEnvironment.poolName is required",
                              field="jobExecutionEnvironment.poolName")
        check_name(env.pool_name, "jobExecutionEnvironment.poolName")
        check_range(req.priority, -1000, 1000, "priority")
        check_env(req.common_environment_settings, "commonEnvironmentSettings")
        max_wall = None
        max_retries = 0
        if req.job_constraints is not None:
            if req.job_constraints.max_wall_clock_time:
                max_wall = parse_duration(req.job_constraints.max_wall_clock_time, "jobConstraints.maxWallClockTime")
            if req.job_constraints.max_task_retry_count is not None:
                max_retries = check_range(req.job_constraints.max_task_retry_count, -1, 10**6,
                                          "jobConstraints.maxTaskRetryCount")
        now = self.clock()
        rec = WorkitemRec(spec=req, created=now, state_time=now)
        self.workitems[req.name] = rec
        rec.job_counter += 1
        job_name = f"job-{rec.job_counter:010d}"
        rec.recent_job = job_name
        self._put("workitem", req.name, rec)
        job = Job(JobRec(workitem=req.name, name=job_name, pool=env.pool_name, priority=req.priority,
                         created=now, state_time=now, max_wall_s=max_wall, max_retries=max_retries,
                         common_env={e.name: e.value for e in req.common_environment_settings}))
        self.jobs[job.key] = job
        self._put("job", job.key, job.rec)

    def get_workitem(self, name: str) -> WorkitemRec:
        wi = self.workitems.get(name)
        if wi is None:
            raise not_found("workitem", name)
        return wi

    def delete_workitem(self, name: str) -> None:
        self.get_workitem(name)
        for job in [j for j in self.jobs.values() if j.rec.workitem == name]:
            self._drop_job(job)
        del self.workitems[name]
        self._delete("workitem", name)

    def _drop_job(self, job: Job) -> None:
        for task in job.tasks.values():
            self._forget_task(job, task)
        del self.jobs[job.key]
        self._delete("job", job.key)
        self._delete("task", job.key + "/", prefix=True)

    def get_job(self, workitem: str, name: str) -> Job:
        self.get_workitem(workitem)
        job = self.jobs.get(f"{workitem}/{name}")
        if job is None:
            raise not_found("job", name)
        return job

    def workitem_jobs(self, workitem: str) -> list[Job]:
        self.get_workitem(workitem)
        return [j for j in self.jobs.values() if j.rec.workitem == workitem]
