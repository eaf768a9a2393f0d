"""State, effects and restore of the pure core (see state.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from protocol import messages as pm

from .records import (
    ACTIVE,
    RUNNING,
    AgentInfo,
    Job,
    JobRec,
    PoolRec,
    TaskRec,
    Tvm,
    TvmRec,
    WorkitemRec,
)

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
    provision: list[tuple[int, str]] = field(default_factory=list)  # (agents wanted, vm size)


class CoreBase:
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

    def _requeue(self, job: Job, task: TaskRec) -> None:
        """A running task goes back to the front of its job's queue: requeueCount+1, retryCount
        unchanged (its TVM was lost, removed or rebooted, or its slot went to a job manager)."""
        now = self.clock()
        task.state = ACTIVE
        task.prev_state = RUNNING
        task.state_time = now
        task.requeue_count += 1
        task.last_requeue = now
        task.tvm = None
        job.queue.appendleft(task)
        self._put_task(job, task)

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
