"""The core's store: every record in memory, the indexes over them and the lookups every area uses.

Plain data plus reads; the areas (tasks, jobs, pools, ...) change it and leave instructions in the
outbox. `restore` rebuilds it from journal rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from coordinator.common.errors import not_found
from protocol.config import MAX_ACTIVE_JOBS, MAX_POOLS, MAX_TASKS, MAX_TASKS_PER_JOB
from protocol.ports import PortRangeConfig

from .freeslots import FreeSlots, TvmTable
from .records import (
    ACTIVE,
    JOB_PREP,
    RUNNING,
    TASK_DONE,
    VM_SIZES,
    AgentInfo,
    CertRec,
    Job,
    JobPrepRec,
    JobRec,
    PoolRec,
    TaskDone,
    TaskRec,
    Tvm,
    TvmRec,
    WorkitemRec,
)
from .states import move_task, move_tvm

# the pool metadata item that names the pool's provisioner
POOL_PROVISIONER_KEY = "provisioner"
DEFAULT_PORT_RANGE = (1100, 32767, 50)  # below the Linux default ephemeral range 32768-60999

_task_dec = msgspec.msgpack.Decoder(TaskRec)
_done_dec = msgspec.msgpack.Decoder(TaskDone)
_job_dec = msgspec.msgpack.Decoder(JobRec)
_wi_dec = msgspec.msgpack.Decoder(WorkitemRec)
_pool_dec = msgspec.msgpack.Decoder(PoolRec)
_tvm_dec = msgspec.msgpack.Decoder(TvmRec)
_cert_dec = msgspec.msgpack.Decoder(CertRec)
_prep_dec = msgspec.msgpack.Decoder(JobPrepRec)


@dataclass(frozen=True)
class AutoscaleTiming:
    """Autoscale's time constants. Production uses the defaults (the real service's); tests pass
    shorter ones to `run_coordinator(autoscale_timing=...)` so hours of evaluation intervals run
    in seconds without touching the clock that heartbeats and timeouts use."""

    sample_period: float = 30.0  # one metrics sample per pool
    visibility_delay: float = 60.0  # samples reach formulas about a minute late (§5.7)
    min_interval: float = 300.0  # autoScaleEvaluationInterval bounds (§5.8: 5 min .. 168 h)
    max_interval: float = 168 * 3600.0
    default_interval: float = 900.0
    enable_throttle: float = 30.0  # enable calls on one pool at least this far apart


def native_size_name(cores: int, memory_bytes: int) -> str:
    return f"native-{cores}c-{memory_bytes // (1024 * 1024)}m"


class Store:
    def __init__(
        self,
        account: str,
        *,
        epoch: int = 1,
        clock: Callable[[], float] = time.time,
        heartbeat_timeout: float = 30.0,
        max_pool_size: int = 1000,
        max_tasks_per_job: int = MAX_TASKS_PER_JOB,
        max_tasks: int = MAX_TASKS,
        max_pools: int = MAX_POOLS,
        max_active_jobs: int = MAX_ACTIVE_JOBS,
        account_url: str = "",
    ) -> None:
        self.account = account
        self.account_url = account_url
        self.epoch = epoch
        self.clock = clock
        self.heartbeat_timeout = heartbeat_timeout
        self.max_pool_size = max_pool_size
        self.max_tasks_per_job = max_tasks_per_job
        self.max_tasks = max_tasks
        self.max_pools = max_pools
        self.max_active_jobs = max_active_jobs
        self.task_count = 0  # tasks in all jobs: kept by every insertion and removal
        self.pools: dict[str, PoolRec] = {}
        # TVMs by name; putting one in or taking it out keeps `free_slots` exact (freeslots.py).
        self.free_slots = FreeSlots()
        self.tvms: dict[str, Tvm] = TvmTable(self.free_slots)
        self.agents: dict[str, AgentInfo] = {}
        self.workitems: dict[str, WorkitemRec] = {}
        self.jobs: dict[str, Job] = {}  # "wi/job"
        self.certificates: dict[str, CertRec] = {}  # "sha1-<thumbprint>"
        # Job preparation/release runs: job key -> TVM name -> record (jobprep.py).
        self.job_preps: dict[str, dict[str, JobPrepRec]] = {}
        self.attempts = 0
        self.seq = 0
        self.recovering_until: float | None = None
        self.placements = 0  # counter for metrics
        self.completions = 0  # likewise: task results recorded (every attempt that ended)
        self.queue_handbacks = 0  # likewise: tasks an agent's queue handed back unstarted
        low, high, per = DEFAULT_PORT_RANGE
        self.port_range = PortRangeConfig(low, high, per, ephemeral=(32768, 60999))
        self.autoscale_timing = AutoscaleTiming()
        # Set by the shell when a provisioner is configured.
        self.provisioning_enabled = False
        self.provision_pending = 0
        self.provision_deadline = 0.0
        # Named provisioners (set by the shell): a pool naming one (metadata `provisioner`, or
        # the default) takes only agents named `<provisioner>-...`, and those go to no other pool.
        self.provisioner_names: frozenset[str] = frozenset()
        self.default_provisioner = ""
        # Agents a provisioner started in this run (set by the shell; named provisioners' agents
        # are known by their names), and those retired since, with why (healing.py). Memory only.
        self.provisioned: set[str] = set()
        self.retired: dict[str, str] = {}
        # TVM healing (healing.py): how long a closed link may stay away before its TVM is lost, how
        # long a lost TVM stays `unknown` before it leaves its pool (a pool's unknownTvmTimeout
        # overrides it), and how many tasks in a row may fail on a TVM (and succeed elsewhere)
        # before it is `unusable`.
        self.link_grace = 5.0
        self.unknown_tvm_timeout = 120.0
        self.unusable_after_failures = 3

    # ------------------------------------------------------------------ lookups (404 when absent)

    def get_pool(self, name: str) -> PoolRec:
        pool = self.pools.get(name)
        if pool is None:
            raise not_found("pool", name)
        return pool

    def get_tvm(self, pool: str, name: str) -> Tvm:
        self.get_pool(pool)
        tvm = self.tvms.get(name)
        if tvm is None or tvm.rec.pool != pool:
            raise not_found("tvm", name)
        return tvm

    def pool_tvms(self, name: str) -> list[Tvm]:
        self.get_pool(name)
        return sorted(
            (t for t in self.tvms.values() if t.rec.pool == name), key=lambda t: t.rec.name
        )

    def get_workitem(self, name: str) -> WorkitemRec:
        wi = self.workitems.get(name)
        if wi is None:
            raise not_found("workitem", name)
        return wi

    def get_job(self, workitem: str, name: str) -> Job:
        self.get_workitem(workitem)
        job = self.jobs.get(f"{workitem}/{name}")
        if job is None:
            raise not_found("job", name)
        return job

    def workitem_jobs(self, workitem: str) -> list[Job]:
        self.get_workitem(workitem)
        return [j for j in self.jobs.values() if j.rec.workitem == workitem]

    def get_task(self, workitem: str, job_name: str, name: str) -> tuple[Job, TaskRec]:
        job = self.get_job(workitem, job_name)
        task = job.tasks.get(name)
        if task is None:
            raise not_found("task", name)
        return job, task

    # ------------------------------------------------------------------ lookups (None when absent)

    def lookup(self, key: str) -> tuple[Job | None, TaskRec | None]:
        """The job and task of a task key "workitem/job/task"."""
        job_key, _, name = key.rpartition("/")
        job = self.jobs.get(job_key)
        if job is None:
            return None, None
        return job, job.tasks.get(name)

    def job_of(self, task_key: str) -> Job | None:
        return self.jobs.get(task_key.rpartition("/")[0])

    def agent_owner(self, agent_id: str) -> str:
        """The named provisioner an agent belongs to ("" for none): its id's first part."""
        owner = agent_id.partition("-")[0]
        return owner if owner in self.provisioner_names else ""

    def is_provisioned(self, agent_id: str) -> bool:
        """Started by a provisioner, which can stop it (a hand-started agent is not)."""
        return agent_id in self.provisioned or bool(self.agent_owner(agent_id))

    def pool_owner(self, pool: PoolRec) -> str:
        for item in pool.spec.metadata or ():
            if item.name == POOL_PROVISIONER_KEY:
                return item.value
        return self.default_provisioner

    def members(self, pool: str) -> list[Tvm]:
        """TVMs that count towards the pool's size (not those on their way out)."""
        return [
            t
            for t in self.tvms.values()
            if t.rec.pool == pool and t.rec.pending_op not in ("leave", "leaving")
        ]

    def all_pool_tvms(self, pool: str) -> list[Tvm]:
        """Every TVM of the pool, leaving ones included."""
        return [t for t in self.tvms.values() if t.rec.pool == pool]

    def connected(self, tvm: Tvm) -> bool:
        agent = self.agents.get(tvm.rec.agent_id)
        return agent is not None and agent.connected

    def running_tasks(self, job: Job) -> list[TaskRec]:
        return [t for t in job.tasks.values() if t.state == RUNNING]

    def vm_sizes(self) -> dict[str, tuple[int, int, int, str]]:
        """name -> (cores, memory MiB, disk GiB, source): built-ins plus each agent's real size."""
        sizes = {k: (*v, "builtin") for k, v in VM_SIZES.items()}
        for a in self.agents.values():
            if a.memory_bytes > 0:
                name = native_size_name(a.cores, a.memory_bytes)
                sizes.setdefault(name, (a.cores, a.memory_bytes // (1024 * 1024), 0, "agent"))
        return sizes

    def size_of(self, pool: PoolRec) -> tuple[int, int, int, str] | None:
        builtin = VM_SIZES.get(pool.spec.vm_size)
        if builtin is not None:  # the common case, without a pass over every agent
            return (*builtin, "builtin")
        return self.vm_sizes().get(pool.spec.vm_size)

    # ------------------------------------------------------------------ restore

    def restore(self, rows: Iterable[tuple[str, str, bytes]]) -> None:
        """Rebuild memory from journal rows (any order). Running tasks become active again:
        placements are not journaled, agents report what they run when they reconnect."""
        tasks: list[tuple[str, TaskRec]] = []
        done: dict[str, TaskDone] = {}
        for kind, key, body in rows:
            if kind == "task":
                tasks.append((key, _task_dec.decode(body)))
            elif kind == TASK_DONE:
                done[key] = _done_dec.decode(body)
            elif kind == "job":
                rec = _job_dec.decode(body)
                self.jobs[key] = Job(rec)
            elif kind == "workitem":
                self.workitems[key] = _wi_dec.decode(body)
            elif kind == "pool":
                self.pools[key] = _pool_dec.decode(body)
            elif kind == "tvm":
                tvm_rec = _tvm_dec.decode(body)
                if tvm_rec.state == "running":
                    # No task is on it until its agent reports them (and idle <-> running flips are
                    # not journaled): Agents.hello sets it running again when it adopts tasks.
                    move_tvm(tvm_rec, "idle")
                pool = self.pools.get(tvm_rec.pool)
                slots = pool.spec.max_tasks_per_vm if pool else 1
                self.tvms[key] = Tvm(tvm_rec, slots)
                info = self.agents.setdefault(tvm_rec.agent_id, AgentInfo(tvm_rec.agent_id))
                info.tvm = tvm_rec.name
                info.disconnected_at = self.clock()
            elif kind == "cert":
                self.certificates[key] = _cert_dec.decode(body)
            elif kind == JOB_PREP:
                prep = _prep_dec.decode(body)
                self.job_preps.setdefault(prep.job, {})[prep.tvm] = prep
        for key, task in sorted(tasks, key=lambda kt: kt[1].seq):
            job = self.jobs.get(key.rsplit("/", 1)[0])
            if job is None:
                continue
            delta = done.get(key)
            if delta is not None:
                delta.apply(task)
            if task.name not in job.tasks:
                self.task_count += 1
            job.tasks[task.name] = task
            job.tally.add(task)  # counted as journaled, then moved: the tally is rebuilt here
            if task.state == RUNNING:
                move_task(task, ACTIVE, job.tally)
            if task.state == ACTIVE:
                job.queue.append(task)
            if task.slots != 1:
                job.wide = True  # placed by slotplace.py
            self.seq = max(self.seq, task.seq)
        # Tvm records referencing pools that no longer exist are dropped silently.
        for name in [n for n, t in self.tvms.items() if t.rec.pool not in self.pools]:
            del self.tvms[name]
        if self.tvms:
            self.recovering_until = self.clock() + self.heartbeat_timeout
