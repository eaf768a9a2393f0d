"""Job preparation and release tasks (reference §1.5.3, §1.5.4), one record per job and TVM.

A job's preparation task runs on a TVM the first time one of the job's tasks is placed there. With
`waitForSuccess` (the default) none of the job's tasks starts on that TVM until it has succeeded;
one that fails after its retries bars the TVM for the job (Azure: the job may never finish there).
It runs as an ordinary task of the agent (same sandbox) under the key `<workitem>/<job>/<prep id>`
on each TVM, and does not take a slot of the TVM in the coordinator's books. When the job ends
(terminated, completed, deleted while active) the release task runs on every TVM that ran the
preparation; the job stays `terminating` until they have ended. Every change is journaled
(`JobPrepRec`, kind `jobprep`), so a restarted coordinator knows where each one ran.
"""

from __future__ import annotations

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request
from coordinator.common.timeutil import parse_duration
from protocol import messages as pm

from .instructions import Outbox
from .records import JOB_PREP, Job, JobPrepRec, JobRec, PrepRun, Tvm, modern_job_id
from .specs import DEFAULT_RETENTION_S, check_job_task, resource_file, task_constraints
from .states import move_prep
from .store import Store

RELEASE_MAX_WALL_S = 15 * 60.0  # Azure's default and maximum for a release task
# Agent answers that say the run never got its chance: it is run again, not counted as a failure.
_NOT_RUN = frozenset({pm.AGENT_STOPPING, pm.QUEUE_HANDED_BACK, "TVMNotReady"})
_READY_TVM = ("idle", "running", "offline")


def check_specs(req: m.WorkitemAdd) -> None:
    """Validate a workitem's preparation and release tasks (400 before anything changes)."""
    prep, rel = req.job_preparation_task, req.job_release_task
    if rel is not None and prep is None:
        raise bad_request(
            "InvalidPropertyValue",
            "jobReleaseTask needs a jobPreparationTask (a release runs where a preparation ran)",
            field="jobReleaseTask",
        )
    if prep is not None:
        check_job_task(prep, "jobPreparationTask")
        if prep.task_constraints is not None:
            task_constraints(prep.task_constraints)
    if rel is not None:
        assert prep is not None
        check_job_task(rel, "jobReleaseTask")
        release_wall(rel)
        if rel.retention_time:
            parse_duration(rel.retention_time, "jobReleaseTask.retentionTime")
        if rel.name.lower() == prep.name.lower():
            raise bad_request(
                "InvalidPropertyValue",
                f"jobReleaseTask.name {rel.name!r} is the jobPreparationTask's name",
                field="jobReleaseTask.name",
            )
    jm = req.job_manager
    for special, field in ((prep, "jobPreparationTask"), (rel, "jobReleaseTask")):
        if jm is not None and special is not None and special.name.lower() == jm.name.lower():
            raise bad_request(
                "InvalidPropertyValue",
                f"{field}.name {special.name!r} is the job manager's name",
                field=f"{field}.name",
            )


def release_wall(rel: m.JobReleaseTask) -> float:
    if not rel.max_wall_clock_time:
        return RELEASE_MAX_WALL_S
    wall = parse_duration(rel.max_wall_clock_time, "jobReleaseTask.maxWallClockTime")
    if wall > RELEASE_MAX_WALL_S or wall <= 0:
        raise bad_request(
            "InvalidPropertyValue",
            "jobReleaseTask.maxWallClockTime must be more than 0 and at most PT15M",
            field="jobReleaseTask.maxWallClockTime",
        )
    return wall


def check_task_name(job: Job, name: str) -> None:
    """A task may not take the id of its job's preparation or release task (409, as Azure)."""
    prep, rel = job.rec.prep, job.rec.release
    if prep is not None and name.lower() == prep.name.lower():
        raise ApiError(
            409,
            "TaskIdSameAsJobPreparationTask",
            f"task {name!r} has the id of the job's preparation task",
            name=name,
        )
    if rel is not None and name.lower() == rel.name.lower():
        raise ApiError(
            409,
            "TaskIdSameAsJobReleaseTask",
            f"task {name!r} has the id of the job's release task",
            name=name,
        )


class JobPrep:
    def __init__(self, store: Store, out: Outbox) -> None:
        self.s = store
        self.out = out

    # ------------------------------------------------------------------ placement gate

    def rank(self, job: Job, tvm: Tvm) -> int:
        """0: the job's tasks may start on `tvm`; 1: its preparation is under way there; 2: not
        started there yet (or must run again); 3: failed there (the TVM is barred for the job)."""
        spec = job.rec.prep
        if spec is None or not spec.wait_for_success:
            return 0
        rec = self.s.job_preps.get(job.key, {}).get(tvm.rec.name)
        run = rec.prep if rec is not None else None
        if run is None or run.state == "pending" or self._rerun_due(spec, rec, tvm):
            return 2
        if run.succeeded:
            return 0
        return 1 if run.state == "running" else 3

    def allows(self, job: Job, tvm: Tvm) -> bool:
        """May one of the job's tasks start on `tvm` now? Starts the preparation task there when
        it has not run yet (or must run again)."""
        spec = job.rec.prep
        if spec is None:
            return True
        recs = self.s.job_preps.setdefault(job.key, {})
        rec = recs.get(tvm.rec.name)
        if rec is None:
            rec = recs[tvm.rec.name] = JobPrepRec(
                job=job.key,
                tvm=tvm.rec.name,
                pool=tvm.rec.pool,
                prep_name=spec.name,
                release_name=job.rec.release.name if job.rec.release else "",
            )
        run = rec.prep
        if run is None or run.state == "pending" or self._rerun_due(spec, rec, tvm):
            self._start_prep(job, rec, tvm)
            return not spec.wait_for_success
        if not spec.wait_for_success:
            return True
        return run.succeeded

    def _rerun_due(self, spec: m.JobPreparationTask, rec: JobPrepRec | None, tvm: Tvm) -> bool:
        """The TVM rebooted since the preparation succeeded there, and it asks to run again."""
        return (
            rec is not None
            and rec.prep is not None
            and rec.prep.succeeded
            and spec.rerun_on_tvm_reboot_after_success
            and tvm.rec.booted > rec.booted
        )

    def _start_prep(self, job: Job, rec: JobPrepRec, tvm: Tvm, retry: bool = False) -> None:
        spec = job.rec.prep
        assert spec is not None
        run = rec.prep
        if run is None:
            run = rec.prep = PrepRun()
        elif run.state == "completed" and not retry:  # a reboot asks for it again
            move_prep(run, "pending")
            run.retry_count = 0
        move_prep(run, "running")
        run.attempt = self._attempt()
        run.start_time = self.s.clock()
        run.end_time = run.exit_code = run.failure = None
        rec.booted = tvm.rec.booted
        wall = retention = None
        if spec.task_constraints is not None:
            wall, _, retention = task_constraints(spec.task_constraints)
        self._send(
            job.rec,
            tvm,
            run.attempt,
            name=spec.name,
            command_line=spec.command_line,
            env=spec.environment_settings,
            files=spec.resource_files,
            wall=wall or 0.0,
            retention=retention,
            elevated=spec.run_elevated,
            kind="jobprep",
        )
        self.out.put(JOB_PREP, rec.key, rec)

    def _attempt(self) -> int:
        s = self.s
        s.attempts += 1
        return (s.epoch << 32) | s.attempts

    def _send(
        self,
        job: JobRec,
        tvm: Tvm,
        attempt: int,
        *,
        name: str,
        command_line: str,
        env: list[m.EnvironmentSetting],
        files: list[m.ResourceFile],
        wall: float,
        retention: float | None,
        elevated: bool,
        kind: str,
    ) -> None:
        wi = self.s.workitems.get(job.workitem)
        scheduled = wi is None or wi.spec.schedule is not None
        spec = pm.TaskSpec(
            key=f"{job.workitem}/{job.name}/{name}",
            attempt=attempt,
            command_line=command_line,
            workitem=job.workitem,
            job=job.name,
            task=name,
            env={**job.common_env, **{e.name: e.value for e in env}},
            resource_files=[resource_file(r) for r in files],
            max_wall_clock_s=wall,
            retention_s=retention if retention is not None else DEFAULT_RETENTION_S,
            run_elevated=elevated,
            job_id=modern_job_id(job.workitem, job.name, True) if scheduled else "",
            job_prep=job.prep.name if job.prep else "",
            kind=kind,
            slots=0,  # runs beside the TVM's tasks, in no slot: it never waits for one
        )
        self.out.send(tvm.rec.agent_id, pm.RunTask(spec=spec))

    # ------------------------------------------------------------------ agent reports

    def owns(self, key: str) -> bool:
        """Is `key` ("<workitem>/<job>/<name>") a preparation or release run?"""
        job_key, _, name = key.rpartition("/")
        recs = self.s.job_preps.get(job_key)
        if not recs:
            return False
        rec = next(iter(recs.values()))
        return name in (rec.prep_name, rec.release_name)

    def _run_of(self, tvm: Tvm | None, key: str) -> tuple[JobPrepRec, PrepRun, bool] | None:
        if tvm is None:
            return None
        job_key, _, name = key.rpartition("/")
        rec = self.s.job_preps.get(job_key, {}).get(tvm.rec.name)
        if rec is None:
            return None
        is_prep = name == rec.prep_name
        run = rec.prep if is_prep else rec.release
        return (rec, run, is_prep) if run is not None else None

    def completed(self, tvm: Tvm | None, msg: pm.TaskCompleted) -> None:
        found = self._run_of(tvm, msg.key)
        if found is None or tvm is None:
            return
        rec, run, is_prep = found
        if run.state != "running" or run.attempt != msg.attempt:
            return  # a resend of what is recorded, or a run given up on: exactly once
        now = self.s.clock()
        failure = msg.failure
        if failure is not None and failure.code in _NOT_RUN:
            move_prep(run, "pending")  # not the task's doing: run it again
            self.out.put(JOB_PREP, rec.key, rec)
            return
        run.start_time = msg.start_time
        run.exit_code = msg.exit_code
        job = self.s.jobs.get(rec.job)
        if is_prep and job is not None and failure is None and msg.exit_code != 0:
            spec = job.rec.prep
            assert spec is not None
            limit = None
            if spec.task_constraints is not None:
                limit = task_constraints(spec.task_constraints)[1]
            if limit is None:
                limit = job.rec.max_retries
            if job.rec.state == "active" and (limit == -1 or run.retry_count < limit):
                run.retry_count += 1
                run.last_retry = now
                move_prep(run, "pending")
                self._start_prep(job, rec, tvm, retry=True)
                return
        move_prep(run, "completed")
        run.end_time = msg.end_time
        run.failure = (failure.category, failure.code, failure.message) if failure else None
        if not is_prep and rec.orphan:
            self._forget(rec)
            return
        self.out.put(JOB_PREP, rec.key, rec)

    def reconcile(self, tvm: Tvm, r: pm.RunningTask) -> None:
        """The agent (re)connected and runs or finished `r`: keep it if it is the run we know,
        else stop it."""
        found = self._run_of(tvm, r.key)
        if found is not None and found[1].state == "running" and found[1].attempt == r.attempt:
            return
        self.out.send(
            tvm.rec.agent_id, pm.CancelTask(key=r.key, attempt=r.attempt, reason="not assigned")
        )

    def hello(self, tvm: Tvm, reported: set[str], in_flight: set[str] | frozenset[str]) -> None:
        """Runs on `tvm` its agent neither runs nor finished (and whose RunTask is not on its way)
        were lost with the agent process: they run again."""
        for recs in self.s.job_preps.values():
            rec = recs.get(tvm.rec.name)
            if rec is None:
                continue
            for run, name in ((rec.prep, rec.prep_name), (rec.release, rec.release_name)):
                key = f"{rec.job}/{name}"
                if run is not None and run.state == "running" and key not in reported | in_flight:
                    move_prep(run, "pending")
                    self.out.put(JOB_PREP, rec.key, rec)

    def tvm_reimaged(self, tvm_name: str) -> None:
        """A reimage wipes the TVM's task directories: every preparation runs there again (one that
        had failed too: Azure bars a node for a job only until it is reimaged)."""
        for recs in self.s.job_preps.values():
            rec = recs.get(tvm_name)
            if rec is not None and rec.prep is not None and rec.prep.state != "pending":
                move_prep(rec.prep, "pending")
                rec.prep.retry_count = 0
                self.out.put(JOB_PREP, rec.key, rec)

    # ------------------------------------------------------------------ the job's end

    def job_ending(self, job: Job) -> None:
        """The job is terminating: stop its preparation runs and start its release task on every
        TVM that ran the preparation."""
        now = self.s.clock()
        for rec in self.s.job_preps.get(job.key, {}).values():
            run = rec.prep
            if run is None:
                continue
            if run.state == "running":
                tvm = self.s.tvms.get(rec.tvm)
                if tvm is not None:
                    self.out.send(
                        tvm.rec.agent_id,
                        pm.CancelTask(
                            key=f"{job.key}/{rec.prep_name}",
                            attempt=run.attempt,
                            reason="job ended",
                        ),
                    )
                move_prep(run, "completed")
                run.end_time = now
                run.failure = ("ServerError", "TaskEnded", "The job ended")
            elif run.state == "pending":
                move_prep(run, "running")
                move_prep(run, "completed")
                run.end_time = now
                run.failure = ("ServerError", "TaskEnded", "The job ended")
            if job.rec.release is not None and rec.release is None:
                rec.release = PrepRun()
                self._start_release(job.rec, rec)
            self.out.put(JOB_PREP, rec.key, rec)

    def _start_release(self, job: JobRec, rec: JobPrepRec) -> bool:
        """Start (or start again) the release run of `rec` when its TVM can take it; otherwise it
        stays pending (`tick` retries). Returns whether it started."""
        spec, run = job.release, rec.release
        assert spec is not None
        assert run is not None
        tvm = self.s.tvms.get(rec.tvm)
        agent = self.s.agents.get(tvm.rec.agent_id) if tvm is not None else None
        if (
            tvm is None
            or agent is None
            or not agent.connected
            or not tvm.ready
            or tvm.rec.state not in _READY_TVM
        ):
            return False
        move_prep(run, "running")
        run.attempt = self._attempt()
        run.start_time = self.s.clock()
        retention = (
            parse_duration(spec.retention_time, "retentionTime") if spec.retention_time else None
        )
        self._send(
            job,
            tvm,
            run.attempt,
            name=spec.name,
            command_line=spec.command_line,
            env=spec.environment_settings,
            files=spec.resource_files,
            wall=release_wall(spec),
            retention=retention,
            elevated=spec.run_elevated,
            kind="jobrelease",
        )
        return True

    def releases_pending(self, job: Job) -> bool:
        """Does a release run of the job still run, or wait for a TVM that is still in its pool?"""
        for rec in self.s.job_preps.get(job.key, {}).values():
            run = rec.release
            if run is not None and run.state != "completed" and rec.tvm in self.s.tvms:
                return True
        return False

    def job_deleted(self, job: Job) -> None:
        """Before the job goes: a job deleted before it ended runs its release tasks first (kept as
        orphan records until they end); the rest of its records and files go now."""
        if job.rec.state not in ("terminating", "completed"):
            self.job_ending(job)
        for rec in list(self.s.job_preps.get(job.key, {}).values()):
            run = rec.release
            if run is not None and run.state != "completed" and rec.tvm in self.s.tvms:
                rec.orphan = True
                self.out.put(JOB_PREP, rec.key, rec)
            else:
                self._forget(rec)

    def _forget(self, rec: JobPrepRec) -> None:
        recs = self.s.job_preps.get(rec.job, {})
        recs.pop(rec.tvm, None)
        if not recs:
            self.s.job_preps.pop(rec.job, None)
        self.out.delete(JOB_PREP, rec.key)
        tvm = self.s.tvms.get(rec.tvm)
        if tvm is not None:
            for name in (rec.prep_name, rec.release_name):
                if name:
                    self.out.send(tvm.rec.agent_id, pm.DeleteTaskFiles(key=f"{rec.job}/{name}"))

    def tick(self) -> None:
        """Release runs that wait for their TVM (lost, or not ready) start once it is back; those
        of deleted jobs whose TVM left are forgotten."""
        for job_key, recs in list(self.s.job_preps.items()):
            job = self.s.jobs.get(job_key)
            for rec in list(recs.values()):
                run = rec.release
                if run is None or run.state != "pending":
                    continue
                if job is None:
                    self._forget(rec)  # a deleted job's release cannot be rebuilt: give up
                    continue
                if self._start_release(job.rec, rec):
                    self.out.put(JOB_PREP, rec.key, rec)

    # ------------------------------------------------------------------ reads

    def status(self, job: Job) -> list[JobPrepRec]:
        """The job's records, one per TVM that ran its preparation (by TVM name)."""
        if job.rec.prep is None and job.rec.release is None:
            raise ApiError(
                409,
                "JobPreparationTaskNotSpecified",
                f"job {job.rec.name!r} has no job preparation task",
            )
        recs = self.s.job_preps.get(job.key, {})
        return [recs[name] for name in sorted(recs) if recs[name].prep is not None]
