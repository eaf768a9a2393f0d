"""The coordinator's pure core: every resource in memory, the scheduler and TVM allocation.

Shaped like dask's WorkerState and h11: methods take a command (REST) or an event (agent message,
clock tick), mutate state, and leave *effects* — journal writes, messages to agents — that the Trio
shell collects with `take_effects()` and carries out. Validation happens before any mutation, so a
refused request leaves nothing behind. No I/O, no Trio.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from protocol import messages as pm
from protocol.paths import validate_relative_path

from . import models as m
from .errors import ApiError, bad_request, conflict, not_found
from .placement import place
from .records import (
    ACTIVE,
    COMPLETED,
    RUNNING,
    VM_SIZES,
    AgentInfo,
    Job,
    JobRec,
    PoolRec,
    TaskRec,
    Tvm,
    TvmRec,
    WorkitemRec,
)
from .timeutil import parse_duration
from .validation import check_env, check_name, check_range

WALL_CLOCK_EXIT_CODE = 0xC000013A
MAX_COLLECTION = 100
DEFAULT_RETENTION_S = 7 * 86400.0

_enc = msgspec.msgpack.Encoder()
_task_dec = msgspec.msgpack.Decoder(TaskRec)
_job_dec = msgspec.msgpack.Decoder(JobRec)
_wi_dec = msgspec.msgpack.Decoder(WorkitemRec)
_pool_dec = msgspec.msgpack.Decoder(PoolRec)
_tvm_dec = msgspec.msgpack.Decoder(TvmRec)


@dataclass(slots=True)
class Write:
    """One journal change: put `body` at (kind, key); None deletes; prefix deletes a key range."""

    kind: str
    key: str
    body: bytes | None
    prefix: bool = False


@dataclass
class Effects:
    writes: list[Write] = field(default_factory=list)
    sends: list[tuple[str, pm.Msg]] = field(default_factory=list)
    closes: list[tuple[str, int, str]] = field(default_factory=list)


class CoordinatorState:
    def __init__(
        self,
        account: str,
        *,
        epoch: int = 1,
        clock: Callable[[], float] = time.time,
        heartbeat_timeout: float = 30.0,
        max_pool_size: int = 1000,
        account_url: str = "",
    ) -> None:
        self.account = account
        self.account_url = account_url
        self.epoch = epoch
        self.clock = clock
        self.heartbeat_timeout = heartbeat_timeout
        self.max_pool_size = max_pool_size
        self.pools: dict[str, PoolRec] = {}
        self.tvms: dict[str, Tvm] = {}
        self.agents: dict[str, AgentInfo] = {}
        self.workitems: dict[str, WorkitemRec] = {}
        self.jobs: dict[str, Job] = {}  # "wi/job"
        self._attempts = 0
        self._seq = 0
        self._fx = Effects()
        self._dirty_pools: set[str] = set()
        self.recovering_until: float | None = None
        self.placements = 0  # counter for metrics

    # ------------------------------------------------------------------ effects

    def take_effects(self) -> Effects:
        fx, self._fx = self._fx, Effects()
        return fx

    def _put(self, kind: str, key: str, rec: msgspec.Struct) -> None:
        self._fx.writes.append(Write(kind, key, _enc.encode(rec)))

    def _delete(self, kind: str, key: str, prefix: bool = False) -> None:
        self._fx.writes.append(Write(kind, key, None, prefix))

    def _send(self, agent_id: str, msg: pm.Msg) -> None:
        self._fx.sends.append((agent_id, msg))

    def _put_task(self, job: Job, task: TaskRec) -> None:
        self._fx.writes.append(Write("task", f"{job.key}/{task.name}", _enc.encode(task)))

    # ------------------------------------------------------------------ restore

    def restore(self, rows: Iterable[tuple[str, str, bytes]]) -> None:
        """Rebuild memory from journal rows (any order). Running tasks become active again:
        placements are not journaled, agents report what they run when they reconnect."""
        tasks: list[tuple[str, TaskRec]] = []
        for kind, key, body in rows:
            if kind == "task":
                tasks.append((key, _task_dec.decode(body)))
            elif kind == "job":
                rec = _job_dec.decode(body)
                self.jobs[key] = Job(rec)
            elif kind == "workitem":
                self.workitems[key] = _wi_dec.decode(body)
            elif kind == "pool":
                self.pools[key] = _pool_dec.decode(body)
            elif kind == "tvm":
                rec = _tvm_dec.decode(body)
                pool = self.pools.get(rec.pool)
                slots = pool.spec.max_tasks_per_vm if pool else 1
                self.tvms[key] = Tvm(rec, slots)
                info = self.agents.setdefault(rec.agent_id, AgentInfo(rec.agent_id))
                info.tvm = rec.name
                info.disconnected_at = self.clock()
        for key, task in sorted(tasks, key=lambda kt: kt[1].seq):
            job = self.jobs.get(key.rsplit("/", 1)[0])
            if job is None:
                continue
            if task.state == RUNNING:
                task.state = ACTIVE
            job.tasks[task.name] = task
            if task.state == ACTIVE:
                job.queue.append(task)
            self._seq = max(self._seq, task.seq)
        # Tvm records referencing pools that no longer exist are dropped silently.
        for name in [n for n, t in self.tvms.items() if t.rec.pool not in self.pools]:
            del self.tvms[name]
        if self.tvms:
            self.recovering_until = self.clock() + self.heartbeat_timeout

    # ------------------------------------------------------------------ pools

    def add_pool(self, req: m.PoolAdd) -> None:
        check_name(req.name)
        if req.name.lower() in (n.lower() for n in self.pools):
            raise conflict("pool", req.name)
        size = VM_SIZES.get(req.vm_size.lower())
        if size is None:
            raise bad_request("InvalidVmSize", f"unknown vmSize {req.vm_size!r}; known sizes: "
                              + ", ".join(VM_SIZES), field="vmSize")
        check_range(req.target_dedicated, 0, self.max_pool_size, "targetDedicated")
        check_range(req.max_tasks_per_vm, 1, 4 * size[0], "maxTasksPerVM")
        if req.tvm_fill_type.lower() not in ("pack", "spread"):
            raise bad_request("InvalidPropertyValue", "tvmFillType must be 'pack' or 'spread'",
                              field="tvmFillType")
        timeout = parse_duration(req.resize_timeout, "resizeTimeout") if req.resize_timeout else 900.0
        if req.start_task is not None:
            check_env(req.start_task.environment_settings, "startTask.environmentSettings")
            self._check_files(req.start_task.resource_files, "startTask.resourceFiles")
            check_range(req.start_task.max_task_retry_count, -1, 1000, "startTask.maxTaskRetryCount")
        now = self.clock()
        spec = msgspec.structs.replace(req, tvm_fill_type=req.tvm_fill_type.lower(),
                                       vm_size=req.vm_size.lower())
        rec = PoolRec(spec=spec, created=now, target=req.target_dedicated, resize_timeout_s=timeout,
                      state_time=now, alloc_time=now)
        self.pools[req.name] = rec
        self._put("pool", req.name, rec)
        self._allocate()

    def get_pool(self, name: str) -> PoolRec:
        pool = self.pools.get(name)
        if pool is None:
            raise not_found("pool", name)
        return pool

    def delete_pool(self, name: str) -> None:
        self.get_pool(name)
        for tvm in [t for t in self.tvms.values() if t.rec.pool == name]:
            self._remove_tvm(tvm, "pool deleted")
        del self.pools[name]
        self._delete("pool", name)

    def resize_pool(self, name: str, req: m.PoolResize) -> None:
        pool = self.get_pool(name)
        if pool.state != "active":
            raise ApiError(409, "PoolNotActive", f"pool {name!r} is {pool.state}")
        if pool.spec.enable_auto_scale:
            raise ApiError(409, "AutoScaleEnabled", f"pool {name!r} has autoscale enabled; disable it to resize")
        check_range(req.target_dedicated, 0, self.max_pool_size, "targetDedicated")
        if req.tvm_deallocation_option not in ("requeue", "terminate", "taskcompletion"):
            raise bad_request("InvalidPropertyValue",
                              "tvmDeallocationOption must be requeue, terminate or taskcompletion",
                              field="tvmDeallocationOption")
        if req.resize_timeout:
            pool.resize_timeout_s = parse_duration(req.resize_timeout, "resizeTimeout")
        pool.target = req.target_dedicated
        pool.resize_error = None
        self._put("pool", name, pool)
        self._allocate()

    def pool_tvms(self, name: str) -> list[Tvm]:
        self.get_pool(name)
        return sorted((t for t in self.tvms.values() if t.rec.pool == name), key=lambda t: t.rec.name)

    def get_tvm(self, pool: str, name: str) -> Tvm:
        self.get_pool(pool)
        tvm = self.tvms.get(name)
        if tvm is None or tvm.rec.pool != pool:
            raise not_found("tvm", name)
        return tvm

    # ------------------------------------------------------------------ allocation

    def _allocate(self) -> None:
        """Give free agents to pools below target; take TVMs back from pools above it."""
        now = self.clock()
        free = sorted(
            (a for a in self.agents.values() if a.connected and a.tvm is None), key=lambda a: a.agent_id
        )
        for name, pool in sorted(self.pools.items(), key=lambda kv: kv[1].created):
            if pool.state != "active":
                continue
            members = [t for t in self.tvms.values() if t.rec.pool == name]
            current = len(members)
            while current < pool.target and free:
                self._join(pool, free.pop(0), now)
                current += 1
            if current > pool.target:
                # Shrink: idle TVMs first, then the least busy.
                victims = sorted(members, key=lambda t: (len(t.running), t.rec.name))[: current - pool.target]
                for tvm in victims:
                    self._remove_tvm(tvm, "pool resized")
                current = pool.target
            want = "steady" if current == pool.target else "resizing"
            if want != pool.alloc_state:
                pool.alloc_state = want
                pool.alloc_time = now
                pool.resize_started = now if want == "resizing" else None
                self._put("pool", name, pool)

    def _join(self, pool: PoolRec, agent: AgentInfo, now: float) -> None:
        name = f"tvm-{secrets.token_hex(5)}"
        rec = TvmRec(name=name, pool=pool.spec.name, agent_id=agent.agent_id, created=now,
                     state="starting", state_time=now, ip=agent.ip)
        tvm = Tvm(rec, pool.spec.max_tasks_per_vm)
        self.tvms[name] = tvm
        agent.tvm = name
        self._put("tvm", name, rec)
        self._send(agent.agent_id, self._join_msg(pool, tvm))

    def _join_msg(self, pool: PoolRec, tvm: Tvm) -> pm.JoinPool:
        st = pool.spec.start_task
        start = None
        if st is not None:
            start = pm.StartTaskSpec(
                command_line=st.command_line,
                env={e.name: e.value for e in st.environment_settings},
                resource_files=[self._rf(r) for r in st.resource_files],
                max_task_retry_count=st.max_task_retry_count,
                wait_for_success=st.wait_for_success,
                run_elevated=st.run_elevated,
            )
        return pm.JoinPool(pool=pool.spec.name, tvm_name=tvm.rec.name, account=self.account,
                           account_url=self.account_url, slots=tvm.slots, start_task=start)

    def _remove_tvm(self, tvm: Tvm, reason: str) -> None:
        self._requeue_tvm_tasks(tvm)
        del self.tvms[tvm.rec.name]
        self._delete("tvm", tvm.rec.name)
        agent = self.agents.get(tvm.rec.agent_id)
        if agent is not None:
            agent.tvm = None
            self._send(agent.agent_id, pm.LeavePool(tvm_name=tvm.rec.name, reason=reason))

    def _set_tvm_state(self, tvm: Tvm, state: str) -> None:
        if tvm.rec.state != state:
            tvm.rec.state = state
            tvm.rec.state_time = self.clock()
            self._put("tvm", tvm.rec.name, tvm.rec)

    def _requeue_tvm_tasks(self, tvm: Tvm) -> None:
        now = self.clock()
        for key, task in list(tvm.running.items()):
            job = self.jobs.get(key.rpartition("/")[0])
            if job is None or task.state != RUNNING:
                continue
            task.state = ACTIVE
            task.prev_state = RUNNING
            task.state_time = now
            task.requeue_count += 1
            task.last_requeue = now
            task.tvm = None
            job.queue.appendleft(task)
            self._put_task(job, task)
        tvm.running.clear()

    # ------------------------------------------------------------------ agents

    def agent_hello(self, hello: pm.Hello) -> None:
        now = self.clock()
        agent = self.agents.get(hello.agent_id)
        if agent is None:
            agent = self.agents[hello.agent_id] = AgentInfo(hello.agent_id)
        agent.connected = True
        agent.hostname = hello.hostname
        agent.ip = hello.ip_address
        agent.cores = hello.cores
        agent.memory_bytes = hello.memory_bytes
        agent.capabilities = list(hello.capabilities)
        agent.last_seen = now
        agent.disconnected_at = None
        tvm = self.tvms.get(agent.tvm) if agent.tvm else None
        if tvm is None:
            agent.tvm = None
            for r in hello.running:  # tasks of a TVM we no longer know
                self._send(agent.agent_id, pm.CancelTask(key=r.key, attempt=r.attempt, reason="unknown TVM"))
            self._allocate()
            return
        tvm.rec.ip = hello.ip_address
        tvm.last_heartbeat = now
        if not tvm.ready:
            # Coordinator restarted (or the agent never confirmed): tell it again who it is.
            self._send(agent.agent_id, self._join_msg(self.pools[tvm.rec.pool], tvm))
        for r in hello.running:
            self._reconcile_running(tvm, r)
        if tvm.rec.state == "unknown":
            self._set_tvm_state(tvm, "running" if tvm.running else "idle")
        self._end_recovery_if_complete()

    def _reconcile_running(self, tvm: Tvm, r: pm.RunningTask) -> None:
        job, task = self._lookup(r.key)
        if task is not None and task.state == RUNNING and task.attempt == r.attempt and task.tvm == tvm.rec.name:
            tvm.running[r.key] = task
            return
        if task is not None and task.state == ACTIVE and (r.attempt >> 32) < self.epoch:
            # Placed by an earlier coordinator run (placements are not journaled): adopt it.
            task.state = RUNNING
            task.attempt = r.attempt
            task.tvm = tvm.rec.name
            task.pool = tvm.rec.pool
            tvm.running[r.key] = task
            return
        self._send(tvm.rec.agent_id, pm.CancelTask(key=r.key, attempt=r.attempt, reason="not assigned"))

    def _end_recovery_if_complete(self) -> None:
        if self.recovering_until is None:
            return
        if all(self.agents.get(t.rec.agent_id) and self.agents[t.rec.agent_id].connected
               for t in self.tvms.values()):
            self.recovering_until = None

    def agent_disconnected(self, agent_id: str) -> None:
        agent = self.agents.get(agent_id)
        if agent is None:
            return
        agent.connected = False
        agent.disconnected_at = self.clock()

    def agent_message(self, agent_id: str, msg: pm.Msg) -> None:
        agent = self.agents.get(agent_id)
        if agent is None:
            return
        now = self.clock()
        agent.last_seen = now
        tvm = self.tvms.get(agent.tvm) if agent.tvm else None
        if isinstance(msg, pm.TaskCompleted):
            self._task_completed(tvm, msg)
        elif isinstance(msg, pm.TaskStarted):
            job, task = self._lookup(msg.key)
            if task is not None and task.state == RUNNING and task.attempt == msg.attempt:
                task.start_time = msg.start_time
        elif isinstance(msg, pm.Heartbeat):
            if tvm is not None:
                tvm.last_heartbeat = now
        elif isinstance(msg, pm.TvmReady):
            if tvm is not None and tvm.rec.name == msg.tvm_name:
                tvm.ready = True
                if tvm.rec.state in ("starting", "unknown", "creating"):
                    self._set_tvm_state(tvm, "running" if tvm.running else "idle")
        elif isinstance(msg, pm.StartTaskCompleted):
            if tvm is not None:
                self._start_task_completed(tvm, msg)
        elif isinstance(msg, pm.Draining):
            if tvm is not None:
                self._set_tvm_state(tvm, "offline")

    def _start_task_completed(self, tvm: Tvm, msg: pm.StartTaskCompleted) -> None:
        tvm.rec.start_task = {
            "state": "completed",
            "start_time": msg.start_time,
            "end_time": msg.end_time,
            "exit_code": msg.exit_code,
            "retry_count": msg.retry_count,
            "failure": [msg.failure.category, msg.failure.code, msg.failure.message] if msg.failure else None,
        }
        pool = self.pools.get(tvm.rec.pool)
        waits = bool(pool and pool.spec.start_task and pool.spec.start_task.wait_for_success)
        if waits and (msg.exit_code != 0 or msg.failure):
            self._set_tvm_state(tvm, "starttaskfailed")
        self._put("tvm", tvm.rec.name, tvm.rec)

    def _task_completed(self, tvm: Tvm | None, msg: pm.TaskCompleted) -> None:
        job, task = self._lookup(msg.key)
        if job is None or task is None or task.state == COMPLETED:
            return  # already recorded (resend after reconnect) or deleted: exactly once
        if task.state == RUNNING and task.attempt != msg.attempt:
            return  # a run we requeued elsewhere; its twin result is not ours
        if task.state == ACTIVE and (msg.attempt >> 32) >= self.epoch:
            return  # requeued in this run of the coordinator: the late result is ignored
        if task.tvm and task.tvm in self.tvms:
            holder = self.tvms[task.tvm]
            holder.running.pop(msg.key, None)
            holder.rec.total_run += 1
            if not holder.running and holder.rec.state == "running":
                self._set_tvm_state(holder, "idle")
        now = self.clock()
        task.start_time = msg.start_time
        task.exit_code = msg.exit_code
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
            task.state = ACTIVE
            task.retry_count += 1
            task.last_retry = now
            task.tvm = None
            job.queue.appendleft(task)
        else:
            task.state = COMPLETED
            task.end_time = msg.end_time
            task.failure = (failure.category, failure.code, failure.message) if failure else None
        self._put_task(job, task)

    # ------------------------------------------------------------------ clock

    def tick(self) -> None:
        """Periodic: lost TVMs, recovery end, resize timeouts."""
        now = self.clock()
        if self.recovering_until is not None and now >= self.recovering_until:
            self.recovering_until = None
        for tvm in list(self.tvms.values()):
            agent = self.agents.get(tvm.rec.agent_id)
            lost = agent is None or (
                not agent.connected
                and agent.disconnected_at is not None
                and now - agent.disconnected_at >= self.heartbeat_timeout
            )
            if agent is not None and agent.connected and now - agent.last_seen >= self.heartbeat_timeout:
                self._fx.closes.append((agent.agent_id, 4008, "heartbeat timeout"))
                agent.connected = False
                agent.disconnected_at = now
            if lost and tvm.rec.state != "unknown":
                self._requeue_tvm_tasks(tvm)
                self._set_tvm_state(tvm, "unknown")
        for name, pool in self.pools.items():
            if (pool.alloc_state == "resizing" and pool.resize_started is not None
                    and now - pool.resize_started >= pool.resize_timeout_s):
                pool.alloc_state = "steady"
                pool.alloc_time = now
                pool.resize_started = None
                pool.resize_error = ("AllocationTimedout",
                                     "Desired number of dedicated TVMs could not be allocated in time")
                self._put("pool", name, pool)

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

    # ------------------------------------------------------------------ tasks

    def _check_files(self, files: list[m.ResourceFile], field: str) -> None:
        for i, rf in enumerate(files):
            try:
                validate_relative_path(rf.file_path)
            except ValueError as exc:
                raise bad_request("InvalidResourceFilePath", f"{field}[{i}].filePath: {exc}",
                                  field=f"{field}[{i}].filePath") from None
            src = rf.blob_source
            if not (src.startswith(("http://", "https://")) or src.startswith("filestore:sha256:")):
                raise bad_request("InvalidResourceFileSource",
                                  f"{field}[{i}].blobSource must be an http(s) URL or filestore:sha256:<hex>",
                                  field=f"{field}[{i}].blobSource")

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
        if job.rec.state != "active":
            raise ApiError(409, "JobNotActive", f"job {job_name!r} is {job.rec.state}; tasks cannot be added",
                           state=job.rec.state)
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
        self._dirty_pools.add(job.rec.pool)

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
        by_pool: dict[str, list[Job]] = {}
        for job in self.jobs.values():
            if job.queue and job.rec.state == "active":
                by_pool.setdefault(job.rec.pool, []).append(job)
        placed = 0
        for pool_name, jobs in by_pool.items():
            pool = self.pools.get(pool_name)
            if pool is None or pool.state != "active":
                continue
            tvms = [
                t for t in self.tvms.values()
                if t.rec.pool == pool_name and t.rec.state in ("idle", "running")
                and t.rec.scheduling == "enabled" and t.free > 0
                and (a := self.agents.get(t.rec.agent_id)) is not None and a.connected
            ]
            for job, task, tvm in place(tvms, jobs, pool.spec.tvm_fill_type):
                self._start(job, task, tvm)
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
