"""Workitems, schedules, jobs and job-manager tasks (part of the pure core).

Job states follow the reference §2.3: active -> disabling -> disabled -> active (enable);
active|disabled -> terminating -> completed (user terminate, maxWallClockTime, job manager done with
killJobOnCompletion, all tasks complete with onAllTasksComplete=terminatejob, workitem terminate).
`terminating` and `disabling` end on the next tick once none of the job's tasks runs any more.
Workitem states (reference §2.4): active, disabled, terminating, completed.
"""

from __future__ import annotations

import hmac
import secrets

from . import models as m
from ._core_base import WALL_CLOCK_EXIT_CODE, CoreBase
from .errors import ApiError, bad_request, conflict, not_found
from .records import ACTIVE, COMPLETED, RUNNING, Job, JobRec, TaskRec, Tvm, WorkitemRec
from .schedule import Plan, decide, parse_schedule
from .timeutil import parse_duration
from .validation import check_env, check_name, check_range

ALL_COMPLETE_ACTIONS = ("noaction", "terminatejob")
DISABLE_OPTIONS = ("requeue", "terminate", "wait")
LIVE_JOB_STATES = ("active", "disabling", "disabled", "enabling")
TOKEN_SCHEME = "TVMJobToken"


def _job_conflict(job: Job, action: str) -> ApiError:
    state = job.rec.state
    code = {"completed": "JobCompleted", "terminating": "JobBeingTerminated",
            "deleting": "JobBeingDeleted"}.get(state, "JobNotActive")
    return ApiError(409, code, f"job {job.rec.name!r} is {state}; cannot {action}", state=state)


def _wi_conflict(wi: WorkitemRec, action: str) -> ApiError:
    state = wi.state
    code = {"completed": "WorkItemCompleted", "terminating": "WorkItemBeingTerminated"}.get(
        state, "WorkItemNotActive")
    return ApiError(409, code, f"workitem {wi.spec.name!r} is {state}; cannot {action}", state=state)


def _job_constraints(c: m.JobConstraints | None) -> tuple[float | None, int | None]:
    if c is None:
        return None, None
    wall = parse_duration(c.max_wall_clock_time, "jobConstraints.maxWallClockTime") \
        if c.max_wall_clock_time else None
    retries = None
    if c.max_task_retry_count is not None:
        retries = check_range(c.max_task_retry_count, -1, 10**6, "jobConstraints.maxTaskRetryCount")
    return wall, retries


def _check_all_complete(value: str | None, field: str = "onAllTasksComplete") -> None:
    if value is not None and value not in ALL_COMPLETE_ACTIONS:
        raise bad_request("InvalidPropertyValue", f"{field} must be noaction or terminatejob, got {value!r}",
                          field=field)


class JobsMixin(CoreBase):
    # TVMs being emptied for a waiting runExclusive job manager (recomputed on every placement pass).
    _jm_reserved: set[str] | frozenset[str] = frozenset()

    # ------------------------------------------------------------------ workitems

    def add_workitem(self, req: m.WorkitemAdd) -> None:
        check_name(req.name)
        if req.name.lower() in (n.lower() for n in self.workitems):
            raise conflict("workitem", req.name)
        env = req.job_execution_environment
        if env.auto_pool_specification is not None:
            self._check_auto_pool(env, req.name)  # type: ignore[attr-defined]  # issue 5: auto pools
        else:
            if not env.pool_name:
                raise bad_request("MissingRequiredProperty", "jobExecutionEnvironment.poolName is required",
                                  field="jobExecutionEnvironment.poolName")
            check_name(env.pool_name, "jobExecutionEnvironment.poolName")
        check_range(req.priority, -1000, 1000, "priority")
        check_env(req.common_environment_settings, "commonEnvironmentSettings")
        _job_constraints(req.job_constraints)
        _check_all_complete(req.on_all_tasks_complete)
        plan = parse_schedule(req.schedule)
        if req.job_manager is not None:
            self._check_job_manager(req.job_manager)
        now = self.clock()
        rec = WorkitemRec(spec=req, created=now, state_time=now, next_run=plan.first_run(now))
        self.workitems[req.name] = rec
        # Without a schedule (or one already due) the first job is created at once.
        self._run_schedule(rec, plan, now)
        self._put("workitem", req.name, rec)

    def _check_job_manager(self, jm: m.JobManager) -> None:
        check_name(jm.name, "jobManager.name")
        if not jm.command_line.strip():
            raise bad_request("MissingRequiredProperty", "jobManager.commandLine must not be empty",
                              field="jobManager.commandLine")
        check_env(jm.environment_settings, "jobManager.environmentSettings")
        self._check_files(jm.resource_files, "jobManager.resourceFiles")  # type: ignore[attr-defined]
        if jm.task_constraints is not None:
            self._constraints(jm.task_constraints)  # type: ignore[attr-defined]

    def get_workitem(self, name: str) -> WorkitemRec:
        wi = self.workitems.get(name)
        if wi is None:
            raise not_found("workitem", name)
        return wi

    def update_workitem(self, name: str, req: m.WorkitemUpdate) -> None:
        """PATCH: the fields present change; they apply to jobs created from now on."""
        wi = self.get_workitem(name)
        if wi.state in ("completed", "terminating"):
            raise _wi_conflict(wi, "update it")
        if req.priority is not None:
            check_range(req.priority, -1000, 1000, "priority")
        _job_constraints(req.job_constraints)
        _check_all_complete(req.on_all_tasks_complete)
        plan = parse_schedule(req.schedule) if req.schedule is not None else None
        changes: dict[str, object] = {}
        for fld in ("priority", "job_constraints", "schedule", "on_all_tasks_complete", "metadata"):
            value = getattr(req, fld)
            if value is not None:
                changes[fld] = value
        import msgspec

        wi.spec = msgspec.structs.replace(wi.spec, **changes)
        if plan is not None:
            wi.next_run = plan.first_run(self.clock())
        self._put("workitem", name, wi)

    def delete_workitem(self, name: str) -> None:
        self.get_workitem(name)
        for job in [j for j in self.jobs.values() if j.rec.workitem == name]:
            self._drop_job(job)
        del self.workitems[name]
        self._delete("workitem", name)

    def terminate_workitem(self, name: str) -> None:
        wi = self.get_workitem(name)
        if wi.state in ("completed", "terminating"):
            raise _wi_conflict(wi, "terminate it")
        now = self.clock()
        for job in self.workitem_jobs(name):
            if job.rec.state in LIVE_JOB_STATES:
                self._terminate_job(job, "TerminateJobSchedule", now)
        wi.next_run = None
        self._set_wi_state(wi, "terminating", now)

    def disable_workitem(self, name: str) -> None:
        wi = self.get_workitem(name)
        if wi.state not in ("active", "disabled"):
            raise _wi_conflict(wi, "disable it")
        self._set_wi_state(wi, "disabled", self.clock())

    def enable_workitem(self, name: str) -> None:
        wi = self.get_workitem(name)
        if wi.state not in ("active", "disabled"):
            raise _wi_conflict(wi, "enable it")
        self._set_wi_state(wi, "active", self.clock())

    def _set_wi_state(self, wi: WorkitemRec, state: str, now: float) -> None:
        if wi.state != state:
            wi.state = state
            wi.state_time = now
            if state == "completed":
                wi.end_time = now
        self._put("workitem", wi.spec.name, wi)

    # ------------------------------------------------------------------ schedules

    def _active_job(self, wi: WorkitemRec) -> Job | None:
        if wi.recent_job is None:
            return None
        job = self.jobs.get(f"{wi.spec.name}/{wi.recent_job}")
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
            wi.state = "completed"
            wi.state_time = wi.end_time = now
            changed = True
        return changed

    def _create_job(self, wi: WorkitemRec, now: float) -> Job:
        spec = wi.spec
        wi.job_counter += 1
        name = f"job-{wi.job_counter:010d}"
        wi.recent_job = name
        wall, retries = _job_constraints(spec.job_constraints)
        jm = spec.job_manager
        rec = JobRec(workitem=spec.name, name=name, pool=self._job_pool(wi, name),  # type: ignore[attr-defined]
                     priority=spec.priority, created=now, state_time=now, max_wall_s=wall,
                     max_retries=retries or 0,
                     common_env={e.name: e.value for e in spec.common_environment_settings},
                     on_all_complete=spec.on_all_tasks_complete,
                     jm_name=jm.name if jm else None, jm_exclusive=bool(jm and jm.run_exclusive),
                     jm_kill=bool(jm.kill_job_on_completion) if jm else True,
                     token=f"{spec.name}.{name}.{secrets.token_urlsafe(24)}")
        job = Job(rec)
        self.jobs[job.key] = job
        self._put("job", job.key, rec)
        if jm is not None:
            self._seq += 1
            wall_t = retries_t = retention = None
            if jm.task_constraints is not None:
                wall_t, retries_t, retention = self._constraints(jm.task_constraints)  # type: ignore[attr-defined]
            task = TaskRec(name=jm.name, command_line=jm.command_line, seq=self._seq, created=now,
                           state_time=now, env={e.name: e.value for e in jm.environment_settings} or None,
                           resource_files=list(jm.resource_files) or None, max_wall_s=wall_t,
                           max_retries=retries_t, retention_s=retention, run_elevated=jm.run_elevated,
                           job_manager=True)
            # Not queued: `_place_job_managers` places it ahead of the job's other tasks.
            job.tasks[task.name] = task
            self._put_task(job, task)
        return job

    # ------------------------------------------------------------------ jobs

    def get_job(self, workitem: str, name: str) -> Job:
        self.get_workitem(workitem)
        job = self.jobs.get(f"{workitem}/{name}")
        if job is None:
            raise not_found("job", name)
        return job

    def workitem_jobs(self, workitem: str) -> list[Job]:
        self.get_workitem(workitem)
        return [j for j in self.jobs.values() if j.rec.workitem == workitem]

    def _check_job_accepts_tasks(self, job: Job) -> None:
        """Tasks may be added to an active or disabled job (they wait), not to an ending one."""
        if job.rec.state not in LIVE_JOB_STATES:
            raise _job_conflict(job, "add tasks")

    def update_job(self, workitem: str, name: str, req: m.JobUpdate) -> None:
        job = self.get_job(workitem, name)
        if job.rec.state not in LIVE_JOB_STATES:
            raise _job_conflict(job, "update it")
        if req.priority is not None:
            check_range(req.priority, -1000, 1000, "priority")
        wall, retries = _job_constraints(req.job_constraints)
        _check_all_complete(req.on_all_tasks_complete)
        if req.on_all_tasks_complete == "noaction" and job.rec.on_all_complete == "terminatejob":
            raise bad_request("InvalidPropertyValue",
                              "onAllTasksComplete cannot change from terminatejob back to noaction",
                              field="onAllTasksComplete")
        if req.priority is not None:
            job.rec.priority = req.priority
        if req.job_constraints is not None:
            if req.job_constraints.max_wall_clock_time is not None:
                job.rec.max_wall_s = wall
            if retries is not None:
                job.rec.max_retries = retries
        if req.on_all_tasks_complete is not None:
            job.rec.on_all_complete = req.on_all_tasks_complete
        self._put("job", job.key, job.rec)

    def terminate_job(self, workitem: str, name: str, reason: str | None = None) -> None:
        job = self.get_job(workitem, name)
        if job.rec.state not in LIVE_JOB_STATES:
            raise _job_conflict(job, "terminate it")
        reason = reason or "UserTerminate"
        if len(reason) > 256:
            raise bad_request("InvalidPropertyValue", "terminateReason is longer than 256 characters",
                              field="terminateReason")
        self._terminate_job(job, reason, self.clock())

    def disable_job(self, workitem: str, name: str, option: str = "requeue") -> None:
        job = self.get_job(workitem, name)
        if option not in DISABLE_OPTIONS:
            raise bad_request("InvalidPropertyValue", f"disableTasks must be requeue, terminate or wait, got {option!r}",
                              field="disableTasks")
        if job.rec.state not in ("active", "disabling", "disabled"):
            raise _job_conflict(job, "disable it")
        now = self.clock()
        if option != "wait":
            for task in self._running_tasks(job):
                if option == "requeue":
                    self._requeue_running(job, task, "job disabled")
                else:
                    self._end_running(job, task, now, "The task was terminated because its job was disabled")
        job.rec.disable_option = option
        self._set_job_state(job, "disabling" if job.rec.state == "active" else job.rec.state, now)

    def enable_job(self, workitem: str, name: str) -> None:
        job = self.get_job(workitem, name)
        if job.rec.state not in ("active", "disabling", "disabled", "enabling"):
            raise _job_conflict(job, "enable it")
        # enabling -> active is immediate: nothing has to be waited for.
        self._set_job_state(job, "active", self.clock())

    def delete_job(self, workitem: str, name: str) -> None:
        job = self.get_job(workitem, name)
        self._drop_job(job)

    def _drop_job(self, job: Job) -> None:
        for task in job.tasks.values():
            self._forget_task(job, task)  # type: ignore[attr-defined]
        del self.jobs[job.key]
        self._delete("job", job.key)
        self._delete("task", job.key + "/", prefix=True)

    def _set_job_state(self, job: Job, state: str, now: float) -> None:
        if job.rec.state != state:
            job.rec.prev_state = job.rec.state
            job.rec.state = state
            job.rec.state_time = now
            if state == "completed":
                job.rec.end_time = now
        self._put("job", job.key, job.rec)

    def _running_tasks(self, job: Job) -> list[TaskRec]:
        return [t for t in job.tasks.values() if t.state == RUNNING]

    def _terminate_job(self, job: Job, reason: str, now: float) -> None:
        """Kill the job's running tasks (they complete); active ones stay active and never run."""
        for task in self._running_tasks(job):
            self._end_running(job, task, now, f"The task was terminated because its job was terminated ({reason})")
        job.rec.terminate_reason = reason
        self._set_job_state(job, "terminating", now)

    def _end_running(self, job: Job, task: TaskRec, now: float, why: str) -> None:
        self._release(job, task, "job ended")  # type: ignore[attr-defined]
        task.prev_state = task.state
        task.state = COMPLETED
        task.state_time = task.end_time = now
        if task.exit_code is None:
            task.exit_code = WALL_CLOCK_EXIT_CODE
        task.failure = ("ServerError", "TaskEnded", why)
        self._put_task(job, task)

    def _requeue_running(self, job: Job, task: TaskRec, reason: str) -> None:
        """Stop a running task and put it back at the front of its job's queue (requeueCount++)."""
        self._release(job, task, reason)  # type: ignore[attr-defined]
        self._requeue(job, task)

    # ------------------------------------------------------------------ events and the clock

    def _job_task_done(self, job: Job, task: TaskRec) -> None:
        """Hook: a task of `job` completed (from the agent, or terminated)."""
        if job.rec.state not in ("active", "disabling", "disabled"):
            return
        now = self.clock()
        if task.job_manager and task.state == COMPLETED and job.rec.jm_kill and task.name == job.rec.jm_name:
            self._terminate_job(job, "JMComplete", now)
        elif job.rec.on_all_complete == "terminatejob" and self._all_complete(job):
            self._terminate_job(job, "AllTasksComplete", now)

    def _all_complete(self, job: Job) -> bool:
        # Active tasks are all in the queue (stale entries are skipped); running ones are on TVMs.
        for t in job.queue:
            if t.state == ACTIVE and job.tasks.get(t.name) is t:
                return False
        if job.rec.jm_name:
            jm = job.tasks.get(job.rec.jm_name)
            if jm is not None and jm.state != COMPLETED:
                return False
        prefix = job.key + "/"
        return not any(k.startswith(prefix) for tvm in self.tvms.values() for k in tvm.running)

    def check_jobs(self) -> None:
        """Periodic (called by tick): schedules, job wall clocks, the end of terminating/disabling."""
        now = self.clock()
        for wi in list(self.workitems.values()):
            if wi.state in ("completed",):
                continue
            plan = parse_schedule(wi.spec.schedule) if wi.next_run is not None else Plan()
            if self._run_schedule(wi, plan, now):
                self._put("workitem", wi.spec.name, wi)
        for job in list(self.jobs.values()):
            r = job.rec
            state = r.state
            if state in LIVE_JOB_STATES and r.max_wall_s is not None and now - r.created >= r.max_wall_s:
                self._terminate_job(job, "MaxWallClockTimeExpiry", now)
            elif state == "active" and r.jm_name and r.jm_kill:
                jm = job.tasks.get(r.jm_name)
                if jm is not None and jm.state == COMPLETED:
                    self._terminate_job(job, "JMComplete", now)
            if state == "active" and r.on_all_complete == "terminatejob" and job.rec.state == "active" \
                    and self._all_complete(job):
                self._terminate_job(job, "AllTasksComplete", now)
            if job.rec.state == "terminating" and not self._running_tasks(job):
                self._set_job_state(job, "completed", now)
                wi = self.workitems.get(r.workitem)
                if wi is not None and self._run_schedule(wi, parse_schedule(wi.spec.schedule), now):
                    self._put("workitem", wi.spec.name, wi)
            elif job.rec.state == "disabling" and not self._running_tasks(job):
                self._set_job_state(job, "disabled", now)

    # ------------------------------------------------------------------ job-manager credentials

    def job_for_token(self, token: str) -> Job | None:
        """The job a job-manager credential belongs to (None if unknown or forged)."""
        parts = token.split(".", 2)
        if len(parts) != 3:
            return None
        job = self.jobs.get(f"{parts[0]}/{parts[1]}")
        if job is None or not job.rec.token or not hmac.compare_digest(job.rec.token, token):
            return None
        return job

    def _jm_env(self, job: Job) -> dict[str, str]:
        """What a job manager needs to call the service for its own job."""
        return {
            "TVM_ENDPOINT": self.account_url,
            "TVM_ACCOUNT": self.account,
            "TVM_JOB_TOKEN": job.rec.token,
            "TVM_WORKITEM_NAME": job.rec.workitem,
            "TVM_JOB_NAME": job.rec.name,
        }

    # ------------------------------------------------------------------ job-manager placement

    def _jm_pending(self, job: Job) -> bool:
        """The job's manager waits to be placed: none of its other tasks may start before it."""
        if not job.rec.jm_name:
            return False
        jm = job.tasks.get(job.rec.jm_name)
        return jm is not None and jm.state == ACTIVE

    def _exclusive_held(self, tvm: Tvm) -> bool:
        """A runExclusive job manager runs on `tvm`, or `tvm` is being emptied for one that waits:
        nothing else may start there."""
        if tvm.rec.name in self._jm_reserved:
            return True
        for key, t in tvm.running.items():
            if t.job_manager:
                job = self.jobs.get(key.rpartition("/")[0])
                if job is None or job.rec.jm_exclusive:
                    return True
        return False

    def _hosts_job_manager(self, tvm: Tvm) -> bool:
        return any(t.job_manager for t in tvm.running.values())

    def _place_job_managers(self) -> int:
        """Place waiting job managers first: restarts before first starts, then by job priority.
        A restarted manager that finds no room requeues tasks of lower-or-equal priority jobs."""
        reserved: set[str] = set()
        self._jm_reserved = reserved
        waiting = [(job, job.tasks[job.rec.jm_name]) for job in self.jobs.values()
                   if job.rec.state == "active" and self._jm_pending(job)]  # type: ignore[index]
        if not waiting:
            return 0
        waiting.sort(key=lambda jt: (-(jt[1].requeue_count + jt[1].retry_count > 0), -jt[0].rec.priority,
                                     jt[0].rec.created))
        placed = 0
        for job, task in waiting:
            pool = self.pools.get(job.rec.pool)
            if pool is None or pool.state != "active":
                continue
            tvms = sorted((
                t for t in self.tvms.values()
                if t.rec.pool == job.rec.pool and t.rec.state in ("idle", "running")
                and t.rec.scheduling == "enabled"
                and (a := self.agents.get(t.rec.agent_id)) is not None and a.connected
            ), key=lambda t: (-t.free, t.rec.name))
            exclusive = job.rec.jm_exclusive
            fits = [t for t in tvms if not self._exclusive_held(t)
                    and (t.free == t.slots if exclusive else t.free > 0)]
            tvm = fits[0] if fits else None
            if tvm is None and task.requeue_count + task.retry_count > 0:
                tvm = self._make_room(job, tvms, exclusive)
            if tvm is not None:
                self._start(job, task, tvm)  # type: ignore[attr-defined]
                placed += 1
            elif exclusive:
                # Without this a busy multi-slot pool could refill every freed slot and never have a
                # whole TVM free: let the least busy TVM drain (nothing new starts there).
                free = [t for t in tvms if not self._exclusive_held(t)]
                if free:
                    reserved.add(min(free, key=lambda t: (len(t.running), t.rec.name)).rec.name)
        return placed

    def _make_room(self, job: Job, tvms: list[Tvm], exclusive: bool) -> Tvm | None:
        """Requeue running tasks of jobs of lower or equal priority on one TVM so `job`'s manager fits.
        Never displaces another job manager or a task of a higher-priority job."""
        best: tuple[int, Tvm, list[tuple[Job, TaskRec]]] | None = None
        for tvm in tvms:
            victims: list[tuple[Job, TaskRec]] = []
            ok = True
            for key, t in tvm.running.items():
                owner = self.jobs.get(key.rpartition("/")[0])
                if t.job_manager or owner is None or owner.rec.priority > job.rec.priority:
                    ok = False
                    break
                victims.append((owner, t))
            if not ok:
                continue
            if not exclusive:
                # One slot is enough: the victim of the lowest priority, most recently started.
                victims.sort(key=lambda ot: (ot[0].rec.priority, -ot[1].state_time))
                victims = victims[:1] if tvm.free == 0 else []
            if best is None or len(victims) < best[0]:
                best = (len(victims), tvm, victims)
        if best is None:
            return None
        for owner, t in best[2]:
            self._requeue_running(owner, t, "making room for a job manager")
        return best[1]
