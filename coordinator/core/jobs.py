"""Workitems, their schedules, and jobs.

Job states follow the reference §2.3: active -> disabling -> disabled -> active (enable);
active|disabled -> terminating -> completed (user terminate, maxWallClockTime, job manager done with
killJobOnCompletion, all tasks complete with onAllTasksComplete=terminatejob, workitem terminate).
`terminating` and `disabling` end on the next tick once none of the job's tasks runs any more.
Workitem states (reference §2.4): active, disabled, terminating, completed.
"""

from __future__ import annotations

import hmac
import secrets

import msgspec

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request, conflict
from coordinator.common.validation import check_env, check_name, check_range

from .instructions import Outbox
from .jobprep import JobPrep, check_specs
from .pools import Pools
from .records import ACTIVE, COMPLETED, TASK_DONE, Job, JobRec, TaskRec, WorkitemRec
from .runs import Runs
from .schedules import Plan, decide, parse_schedule
from .specs import (
    check_all_complete,
    check_job_task,
    check_max_parallel,
    job_constraints,
    task_constraints,
)
from .states import JobState, WorkitemState, move_job, move_workitem
from .store import Store

DISABLE_OPTIONS = ("requeue", "terminate", "wait")
LIVE_JOB_STATES = ("active", "disabling", "disabled", "enabling")
TOKEN_SCHEME = "TVMJobToken"


def _job_conflict(job: Job, action: str) -> ApiError:
    state = job.rec.state
    code = {
        "completed": "JobCompleted",
        "terminating": "JobBeingTerminated",
        "deleting": "JobBeingDeleted",
    }.get(state, "JobNotActive")
    return ApiError(409, code, f"job {job.rec.name!r} is {state}; cannot {action}", state=state)


def _wi_conflict(wi: WorkitemRec, action: str) -> ApiError:
    state = wi.state
    code = {"completed": "WorkItemCompleted", "terminating": "WorkItemBeingTerminated"}.get(
        state, "WorkItemNotActive"
    )
    return ApiError(
        409, code, f"workitem {wi.spec.name!r} is {state}; cannot {action}", state=state
    )


def check_job_manager(jm: m.JobManager) -> None:
    check_job_task(jm, "jobManager")
    if jm.task_constraints is not None:
        task_constraints(jm.task_constraints)


# What PATCH /workitems/{wi} may change (for the jobs it creates from then on).
_WORKITEM_UPDATABLE = (
    "priority",
    "job_constraints",
    "schedule",
    "on_all_tasks_complete",
    "metadata",
    "max_parallel_tasks",
)


class Jobs:
    def __init__(self, store: Store, out: Outbox, runs: Runs, pools: Pools) -> None:
        self.s = store
        self.out = out
        self.runs = runs
        self.pools = pools
        self.prep: JobPrep | None = None  # set by the facade (preparation and release tasks)

    # ------------------------------------------------------------------ workitems

    def add_workitem(self, req: m.WorkitemAdd) -> None:
        check_name(req.name)
        if req.name.lower() in (n.lower() for n in self.s.workitems):
            raise conflict("workitem", req.name)
        plan = self._check_workitem(req)
        active = sum(1 for wi in self.s.workitems.values() if wi.state != "completed")
        if active >= self.s.max_active_jobs:
            raise ApiError(
                409,
                "ActiveJobAndScheduleQuotaReached",
                f"the account has {active:,} workitems (jobs and job schedules) not yet completed, "
                f"the most this coordinator allows ({self.s.max_active_jobs:,}: max-active-jobs "
                "in its configuration). Terminate or delete one, or raise the limit.",
                limit=self.s.max_active_jobs,
            )
        now = self.s.clock()
        rec = WorkitemRec(spec=req, created=now, state_time=now, next_run=plan.first_run(now))
        self.s.workitems[req.name] = rec
        # Without a schedule (or one already due) the first job is created at once.
        self._run_schedule(rec, plan, now)
        self.out.put("workitem", req.name, rec)

    def replace_workitem(self, name: str, req: m.WorkitemAdd) -> None:
        """Replace a workitem's whole specification (a job schedule's PUT or PATCH): jobs created
        from now on use it, jobs already created keep theirs. A changed schedule starts afresh."""
        wi = self.s.get_workitem(name)
        if wi.state in ("completed", "terminating"):
            raise _wi_conflict(wi, "update it")
        if req.name != wi.spec.name:
            raise bad_request(
                "InvalidPropertyValue", "a workitem's name cannot be changed", field="name"
            )
        if (req.schedule is None) != (wi.spec.schedule is None):
            raise bad_request(
                "InvalidPropertyValue",
                "a workitem's schedule can be changed but not added or removed",
                field="schedule",
            )
        plan = self._check_workitem(req)
        changed = req.schedule != wi.spec.schedule
        wi.spec = req
        if changed:
            wi.next_run = plan.first_run(self.s.clock())
        self.out.put("workitem", name, wi)

    def _check_workitem(self, req: m.WorkitemAdd) -> Plan:
        """Validate a workitem's specification (400 naming the field); its schedule's plan."""
        env = req.job_execution_environment
        if env.auto_pool_specification is not None:
            self.pools.check_auto_pool(env)
        else:
            if not env.pool_name:
                raise bad_request(
                    "MissingRequiredProperty",
                    "jobExecutionEnvironment.poolName is required",
                    field="jobExecutionEnvironment.poolName",
                )
            check_name(env.pool_name, "jobExecutionEnvironment.poolName")
        check_range(req.priority, -1000, 1000, "priority")
        check_env(req.common_environment_settings, "commonEnvironmentSettings")
        job_constraints(req.job_constraints)
        check_all_complete(req.on_all_tasks_complete)
        check_max_parallel(req.max_parallel_tasks)
        if req.on_task_failure not in ("noaction", "performexitoptionsjobaction"):
            raise bad_request(
                "InvalidPropertyValue",
                "onTaskFailure must be noaction or performexitoptionsjobaction, "
                f"got {req.on_task_failure!r}",
                field="onTaskFailure",
            )
        plan = parse_schedule(req.schedule)
        if req.job_manager is not None:
            check_job_manager(req.job_manager)
        check_specs(req)
        return plan

    def update_workitem(self, name: str, req: m.WorkitemUpdate) -> None:
        """PATCH: the fields present change; they apply to jobs created from now on."""
        wi = self.s.get_workitem(name)
        if wi.state in ("completed", "terminating"):
            raise _wi_conflict(wi, "update it")
        if req.priority is not None:
            check_range(req.priority, -1000, 1000, "priority")
        job_constraints(req.job_constraints)
        check_all_complete(req.on_all_tasks_complete)
        check_max_parallel(req.max_parallel_tasks)
        plan = parse_schedule(req.schedule) if req.schedule is not None else None
        changes: dict[str, object] = {}
        for fld in _WORKITEM_UPDATABLE:
            value = getattr(req, fld)
            if value is not None:
                changes[fld] = value
        wi.spec = msgspec.structs.replace(wi.spec, **changes)
        if plan is not None:
            wi.next_run = plan.first_run(self.s.clock())
        self.out.put("workitem", name, wi)

    def delete_workitem(self, name: str) -> None:
        self.s.get_workitem(name)
        for job in [j for j in self.s.jobs.values() if j.rec.workitem == name]:
            self._drop_job(job)
        del self.s.workitems[name]
        self.out.delete("workitem", name)

    def terminate_workitem(self, name: str) -> None:
        wi = self.s.get_workitem(name)
        if wi.state in ("completed", "terminating"):
            raise _wi_conflict(wi, "terminate it")
        now = self.s.clock()
        for job in self.s.workitem_jobs(name):
            if job.rec.state in LIVE_JOB_STATES:
                self.terminate(job, "TerminateJobSchedule", now)
        wi.next_run = None
        self._set_wi_state(wi, "terminating", now)

    def disable_workitem(self, name: str) -> None:
        wi = self.s.get_workitem(name)
        if wi.state not in ("active", "disabled"):
            raise _wi_conflict(wi, "disable it")
        self._set_wi_state(wi, "disabled", self.s.clock())

    def enable_workitem(self, name: str) -> None:
        wi = self.s.get_workitem(name)
        if wi.state not in ("active", "disabled"):
            raise _wi_conflict(wi, "enable it")
        self._set_wi_state(wi, "active", self.s.clock())

    def _set_wi_state(self, wi: WorkitemRec, state: WorkitemState, now: float) -> None:
        if wi.state != state:
            move_workitem(wi, state)
            wi.state_time = now
            if state == "completed":
                wi.end_time = now
        self.out.put("workitem", wi.spec.name, wi)

    # ------------------------------------------------------------------ schedules

    def _active_job(self, wi: WorkitemRec) -> Job | None:
        if wi.recent_job is None:
            return None
        job = self.s.jobs.get(f"{wi.spec.name}/{wi.recent_job}")
        return job if job is not None and job.rec.state != "completed" else None

    def _run_schedule(self, wi: WorkitemRec, plan: Plan, now: float) -> bool:
        """Create the workitem's next job if one is due; complete the workitem when none will be.
        Returns whether the record changed (the caller journals it)."""
        active = self._active_job(wi)
        changed = False
        if wi.state == "active":
            d = decide(plan, wi.next_run, now, active is not None)
            if d.next_run != wi.next_run:
                wi.next_run = d.next_run
                changed = True
            if d.create:
                self._create_job(wi, now)
                active = self._active_job(wi)
                changed = True
        if wi.state in ("active", "terminating") and wi.next_run is None and active is None:
            move_workitem(wi, "completed")
            wi.state_time = wi.end_time = now
            changed = True
        return changed

    def _create_job(self, wi: WorkitemRec, now: float) -> Job:
        spec = wi.spec
        wi.job_counter += 1
        name = f"job-{wi.job_counter:010d}"
        wi.recent_job = name
        wall, retries = job_constraints(spec.job_constraints)
        jm = spec.job_manager
        rec = JobRec(
            workitem=spec.name,
            name=name,
            pool=self.pools.job_pool(wi, name),
            priority=spec.priority,
            created=now,
            state_time=now,
            max_wall_s=wall,
            max_retries=retries or 0,
            common_env={e.name: e.value for e in spec.common_environment_settings},
            on_all_complete=spec.on_all_tasks_complete,
            uses_deps=spec.uses_task_dependencies,
            on_task_failure=spec.on_task_failure,
            max_parallel=spec.max_parallel_tasks,
            jm_name=jm.name if jm else None,
            jm_exclusive=bool(jm and jm.run_exclusive),
            jm_kill=bool(jm.kill_job_on_completion) if jm else True,
            token=f"{spec.name}.{name}.{secrets.token_urlsafe(24)}",
            prep=spec.job_preparation_task,
            release=spec.job_release_task,
        )
        job = Job(rec)
        self.s.jobs[job.key] = job
        self.out.put("job", job.key, rec)
        if jm is not None:
            self.s.seq += 1
            wall_t = retries_t = retention = None
            if jm.task_constraints is not None:
                wall_t, retries_t, retention = task_constraints(jm.task_constraints)
            task = TaskRec(
                name=jm.name,
                command_line=jm.command_line,
                seq=self.s.seq,
                created=now,
                state_time=now,
                env={e.name: e.value for e in jm.environment_settings} or None,
                resource_files=list(jm.resource_files) or None,
                max_wall_s=wall_t,
                max_retries=retries_t,
                retention_s=retention,
                run_elevated=jm.run_elevated,
                job_manager=True,
            )
            # Not queued: the scheduler places it ahead of the job's other tasks.
            job.tasks[task.name] = task
            self.s.task_count += 1  # one per job, never refused: bounded by the jobs
            job.tally.add(task)
            self.runs.put_task(job, task)
        return job

    # ------------------------------------------------------------------ jobs

    def check_accepts_tasks(self, job: Job) -> None:
        """Tasks may be added to an active or disabled job (they wait), not to an ending one."""
        if job.rec.state not in LIVE_JOB_STATES:
            raise _job_conflict(job, "add tasks")

    def update_job(self, workitem: str, name: str, req: m.JobUpdate) -> None:
        job = self.s.get_job(workitem, name)
        if job.rec.state not in LIVE_JOB_STATES:
            raise _job_conflict(job, "update it")
        if req.priority is not None:
            check_range(req.priority, -1000, 1000, "priority")
        wall, retries = job_constraints(req.job_constraints)
        check_all_complete(req.on_all_tasks_complete)
        check_max_parallel(req.max_parallel_tasks)
        if req.on_all_tasks_complete == "noaction" and job.rec.on_all_complete == "terminatejob":
            raise bad_request(
                "InvalidPropertyValue",
                "onAllTasksComplete cannot change from terminatejob back to noaction",
                field="onAllTasksComplete",
            )
        if req.priority is not None:
            job.rec.priority = req.priority
        if req.job_constraints is not None:
            if req.job_constraints.max_wall_clock_time is not None:
                job.rec.max_wall_s = wall
            if retries is not None:
                job.rec.max_retries = retries
        if req.on_all_tasks_complete is not None:
            job.rec.on_all_complete = req.on_all_tasks_complete
        if req.max_parallel_tasks is not None:
            job.rec.max_parallel = req.max_parallel_tasks
        self.out.put("job", job.key, job.rec)

    def terminate_job(self, workitem: str, name: str, reason: str | None = None) -> None:
        job = self.s.get_job(workitem, name)
        if job.rec.state not in LIVE_JOB_STATES:
            raise _job_conflict(job, "terminate it")
        reason = reason or "UserTerminate"
        if len(reason) > 256:
            raise bad_request(
                "InvalidPropertyValue",
                "terminateReason is longer than 256 characters",
                field="terminateReason",
            )
        self.terminate(job, reason, self.s.clock())

    def disable_job(self, workitem: str, name: str, option: str = "requeue") -> None:
        job = self.s.get_job(workitem, name)
        if option not in DISABLE_OPTIONS:
            raise bad_request(
                "InvalidPropertyValue",
                f"disableTasks must be requeue, terminate or wait, got {option!r}",
                field="disableTasks",
            )
        if job.rec.state not in ("active", "disabling", "disabled"):
            raise _job_conflict(job, "disable it")
        now = self.s.clock()
        if option != "wait":
            for task in self.s.running_tasks(job):
                if option == "requeue":
                    self.runs.requeue_running(job, task, "job disabled")
                else:
                    self.runs.end_running(
                        job, task, now, "The task was terminated because its job was disabled"
                    )
        job.rec.disable_option = option
        self._set_job_state(job, "disabling" if job.rec.state == "active" else job.rec.state, now)

    def enable_job(self, workitem: str, name: str) -> None:
        job = self.s.get_job(workitem, name)
        if job.rec.state not in ("active", "disabling", "disabled", "enabling"):
            raise _job_conflict(job, "enable it")
        # enabling -> active is immediate: nothing has to be waited for.
        self._set_job_state(job, "active", self.s.clock())

    def delete_job(self, workitem: str, name: str) -> None:
        self._drop_job(self.s.get_job(workitem, name))

    def _drop_job(self, job: Job) -> None:
        if self.prep is not None and job.rec.prep is not None:
            self.prep.job_deleted(job)  # its release tasks run first
        for task in job.tasks.values():
            self.runs.forget_task(job, task)
        del self.s.jobs[job.key]
        self.s.task_count -= len(job.tasks)
        self.out.delete("job", job.key)
        self.out.delete("task", job.key + "/", prefix=True)
        self.out.delete(TASK_DONE, job.key + "/", prefix=True)

    def _set_job_state(self, job: Job, state: JobState, now: float) -> None:
        if job.rec.state != state:
            job.rec.prev_state = move_job(job.rec, state)
            job.rec.state_time = now
            if state == "completed":
                job.rec.end_time = now
        self.out.put("job", job.key, job.rec)

    def terminate(self, job: Job, reason: str, now: float) -> None:
        """Kill the job's running tasks (they complete); active ones stay active and never run."""
        for task in self.s.running_tasks(job):
            self.runs.end_running(
                job, task, now, f"The task was terminated because its job was terminated ({reason})"
            )
        job.rec.terminate_reason = reason
        self._set_job_state(job, "terminating", now)
        if self.prep is not None and job.rec.prep is not None:
            self.prep.job_ending(job)  # release tasks; the job completes when they have ended

    # ------------------------------------------------------------------ events and the clock

    def task_done(self, job: Job, task: TaskRec) -> None:
        """A task of `job` completed (reported by its agent)."""
        if job.rec.state not in ("active", "disabling", "disabled"):
            return
        if (
            task.job_manager
            and task.state == COMPLETED
            and job.rec.jm_kill
            and task.name == job.rec.jm_name
        ):
            self.terminate(job, "JMComplete", self.s.clock())
        elif job.rec.on_all_complete == "terminatejob" and self._all_complete(job):
            self.terminate(job, "AllTasksComplete", self.s.clock())

    def _all_complete(self, job: Job) -> bool:
        if job.deps is not None and job.deps.pending:
            return False  # tasks waiting for (or blocked by) dependencies are active
        # Ready active tasks are all in the queue (stale entries skipped); running ones on TVMs.
        for t in job.queue:
            if t.state == ACTIVE and job.tasks.get(t.name) is t:
                return False
        if job.rec.jm_name:
            jm = job.tasks.get(job.rec.jm_name)
            if jm is not None and jm.state != COMPLETED:
                return False
        prefix = job.key + "/"
        return not any(k.startswith(prefix) for tvm in self.s.tvms.values() for k in tvm.running)

    def check_jobs(self) -> None:
        """Periodic (called by tick): schedules, job wall clocks, the end of terminating/disabling."""
        s = self.s
        now = s.clock()
        for wi in list(s.workitems.values()):
            if wi.state in ("completed",):
                continue
            plan = parse_schedule(wi.spec.schedule) if wi.next_run is not None else Plan()
            if self._run_schedule(wi, plan, now):
                self.out.put("workitem", wi.spec.name, wi)
        for job in list(s.jobs.values()):
            r = job.rec
            state = r.state
            if (
                state in LIVE_JOB_STATES
                and r.max_wall_s is not None
                and now - r.created >= r.max_wall_s
            ):
                self.terminate(job, "MaxWallClockTimeExpiry", now)
            elif state == "active" and r.jm_name and r.jm_kill:
                jm = job.tasks.get(r.jm_name)
                if jm is not None and jm.state == COMPLETED:
                    self.terminate(job, "JMComplete", now)
            if (
                state == "active"
                and r.on_all_complete == "terminatejob"
                and job.rec.state == "active"
                and self._all_complete(job)
            ):
                self.terminate(job, "AllTasksComplete", now)
            if (
                job.rec.state == "terminating"
                and not s.running_tasks(job)
                and not (self.prep is not None and self.prep.releases_pending(job))
            ):
                self._set_job_state(job, "completed", now)
                owner = s.workitems.get(r.workitem)
                if owner is not None and self._run_schedule(
                    owner, parse_schedule(owner.spec.schedule), now
                ):
                    self.out.put("workitem", owner.spec.name, owner)
            elif job.rec.state == "disabling" and not s.running_tasks(job):
                self._set_job_state(job, "disabled", now)

    # ------------------------------------------------------------------ job-manager credentials

    def job_for_token(self, token: str) -> Job | None:
        """The job a job-manager credential belongs to (None if unknown or forged)."""
        parts = token.split(".", 2)
        if len(parts) != 3:
            return None
        job = self.s.jobs.get(f"{parts[0]}/{parts[1]}")
        if job is None or not job.rec.token or not hmac.compare_digest(job.rec.token, token):
            return None
        return job
