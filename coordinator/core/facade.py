"""`CoordinatorState`: the core's one public class, composed of its areas.

Commands (REST) and events (agent messages, the clock tick) come in here; each is handed to the
area that owns it. Where one event concerns several areas (the tick, an agent message, adding or
deleting a pool, restoring from the journal), this class calls them in order, explicitly. The
areas are built bottom-up and each gets only the ones below it (imports go the same way):

    store, outbox       records and indexes; instructions for the shell
    runs                tasks on TVMs (start, stop, requeue, end), TVM state changes
    membership, certs   agents joining and leaving pools, ports, members; certificates
    pools               pool commands, auto pools
    tvm_ops, jobs,      operations on one TVM; workitems, schedules, jobs;
    autoscale           metric samples, formula runs
    tasks               task commands and completions
    scheduler, agents   the placement decision; agent registration and reports
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, overload

from coordinator.common import models as m
from protocol import messages as pm
from protocol.ports import PortRangeConfig

from .agents import Agents
from .autoscale import Autoscale, RunRec
from .certs import Certs
from .healing import Healing
from .instructions import Effects, Outbox
from .jobprep import JobPrep
from .jobs import Jobs
from .membership import Membership
from .metrics_history import MetricsHistory
from .pools import Pools
from .records import (
    AgentInfo,
    CertRec,
    Job,
    JobPrepRec,
    PoolRec,
    TaskRec,
    Tvm,
    TvmUserRec,
    WorkitemRec,
)
from .runs import Runs
from .scheduler import Scheduler
from .specs import MAX_ACTIVE_JOBS, MAX_POOLS, MAX_TASKS, MAX_TASKS_PER_JOB
from .store import AutoscaleTiming, Store
from .tasks import Tasks
from .tvm_ops import TvmOps

T = TypeVar("T")


RATE_SAMPLE_S = 1.0
RATE_SAMPLES = 600


class _StoreField(Generic[T]):
    """A facade attribute that is the store's attribute of the same name (read and write): for the
    settings and counters the shell sets or reads."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _StoreField[T]: ...
    @overload
    def __get__(self, obj: CoordinatorState, owner: type) -> T: ...

    def __get__(self, obj: CoordinatorState | None, owner: type) -> Any:
        if obj is None:
            return self
        return getattr(obj.store, self.name)

    def __set__(self, obj: CoordinatorState, value: T) -> None:
        setattr(obj.store, self.name, value)


class CoordinatorState:
    """The whole pure core: methods take a command or an event, change the store, and leave
    instructions that the Trio shell collects with `take_effects()`. Validation happens before
    any change, so a refused request leaves nothing behind. No I/O."""

    account = _StoreField[str]()
    account_url = _StoreField[str]()
    epoch = _StoreField[int]()
    clock = _StoreField[Callable[[], float]]()
    heartbeat_timeout = _StoreField[float]()
    max_pool_size = _StoreField[int]()
    recovering_until = _StoreField[float | None]()
    placements = _StoreField[int]()
    completions = _StoreField[int]()
    queue_handbacks = _StoreField[int]()
    port_range = _StoreField[PortRangeConfig]()
    autoscale_timing = _StoreField[AutoscaleTiming]()
    provisioning_enabled = _StoreField[bool]()
    provision_pending = _StoreField[int]()
    link_grace = _StoreField[float]()
    unknown_tvm_timeout = _StoreField[float]()
    unusable_after_failures = _StoreField[int]()

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
        self.store = store = Store(
            account,
            epoch=epoch,
            clock=clock,
            heartbeat_timeout=heartbeat_timeout,
            max_pool_size=max_pool_size,
            max_tasks_per_job=max_tasks_per_job,
            max_tasks=max_tasks,
            max_pools=max_pools,
            max_active_jobs=max_active_jobs,
            account_url=account_url,
        )
        self.outbox = out = Outbox()
        # The store's collections are never replaced, only changed: the facade shares them.
        self.pools: dict[str, PoolRec] = store.pools
        self.tvms: dict[str, Tvm] = store.tvms
        self.agents: dict[str, AgentInfo] = store.agents
        self.workitems: dict[str, WorkitemRec] = store.workitems
        self.jobs: dict[str, Job] = store.jobs
        self.certificates: dict[str, CertRec] = store.certificates
        self.runs = Runs(store, out)
        self.membership = Membership(store, out, self.runs)
        self.certs = Certs(store, out)
        self.pool_area = Pools(store, out, self.certs, self.membership)
        self.tvm_ops = TvmOps(store, out, self.runs, self.membership, self.pool_area)
        self.job_area = Jobs(store, out, self.runs, self.pool_area)
        self.autoscale = Autoscale(store, out, self.membership)
        # (time, placements, completions) about once a second for the last RATE_SAMPLES seconds:
        # the dashboard's rates start from before anyone opened it (one append per tick).
        self.rate_samples: deque[tuple[float, int, int]] = deque(maxlen=RATE_SAMPLES)
        self.tasks = Tasks(store, out, self.runs, self.job_area)
        self.scheduler = Scheduler(store, self.runs)
        self.agent_area = Agents(store, out, self.runs, self.membership, self.tasks)
        self.healing = Healing(store, out, self.runs, self.membership)
        self.tasks.on_result = self.healing.task_result
        # Job preparation and release tasks: the areas that place, end and report runs call it.
        self.jobprep = JobPrep(store, out)
        self.job_area.prep = self.scheduler.prep = self.agent_area.prep = self.jobprep

    @property
    def metrics(self) -> MetricsHistory:
        return self.autoscale.metrics

    @property
    def unusable_free_disk_bytes(self) -> int:
        return self.healing.unusable_free_disk_bytes

    @unusable_free_disk_bytes.setter
    def unusable_free_disk_bytes(self, value: int) -> None:
        self.healing.unusable_free_disk_bytes = value

    def take_effects(self) -> Effects:
        return self.outbox.take()

    # ------------------------------------------------------------------ events that span areas

    def restore(self, rows: Iterable[tuple[str, str, bytes]]) -> None:
        """Rebuild memory from journal rows (any order); see Store.restore."""
        self.store.restore(rows)
        self.tasks.deps.rebuild(self.store.jobs.values())

    def tick(self) -> None:
        """Periodic: lost TVMs, recovery end, resize timeouts, pending TVM operations, auto pools,
        allocation, schedules and job ends, metric samples and autoscale runs."""
        now = self.store.clock()
        self.autoscale.before_tick()
        self.agent_area.end_recovery_if_due(now)
        self.tvm_ops.expire_users()
        self.agent_area.check_lost(now)
        self.healing.expire_unknown(now)
        self.pool_area.expire_resizes(now)
        self.membership.advance_all()
        for name in self.pool_area.release_auto_pools():
            self.autoscale.pool_deleted(name)
        self.membership.allocate()
        if self.store.job_preps:
            self.jobprep.tick()
        self.job_area.check_jobs()
        self.autoscale.after_tick(now)
        if not self.rate_samples or now - self.rate_samples[-1][0] >= RATE_SAMPLE_S:
            self.rate_samples.append((now, self.store.placements, self.store.completions))

    def agent_hello(
        self, hello: pm.Hello, in_flight: set[str] | frozenset[str] = frozenset()
    ) -> None:
        """`in_flight`: keys of RunTasks still on their way to the agent (its session resumed)."""
        self.agent_area.hello(hello, in_flight)

    def agent_disconnected(self, agent_id: str) -> None:
        self.agent_area.disconnected(agent_id)

    def agent_message(self, agent_id: str, msg: pm.Msg) -> None:
        if isinstance(msg, pm.Heartbeat):
            self.autoscale.heartbeat(agent_id, msg)
            self.agent_area.message(agent_id, msg)
            self.healing.heartbeat(agent_id, msg)
            return
        self.agent_area.message(agent_id, msg)

    def agent_exited(self, agent_id: str, why: str) -> None:
        """The shell saw the agent's process end (local provisioner): its TVM is lost now."""
        self.healing.agent_exited(agent_id, why)

    def tvm_degraded(self, tvm: Tvm) -> list[str]:
        """Every degraded mode of a TVM, for its record and `tvm status`."""
        return self.healing.degraded_modes(tvm)

    def agents_started(self, names: list[str]) -> None:
        """A provisioner started these agents: lost for good, they are retired (healing.py)."""
        self.healing.agents_started(names)

    def retired_reason(self, agent_id: str) -> str:
        return self.healing.retired_reason(agent_id)

    def forget_agent(self, agent_id: str) -> None:
        self.agent_area.forget(agent_id)

    def schedule(self) -> int:
        """Place what can be placed now; returns the number of tasks placed."""
        return self.scheduler.schedule()

    def check_jobs(self) -> None:
        self.job_area.check_jobs()

    def expect_agents(self, n: int) -> None:
        self.membership.expect_agents(n)

    def tvm_left(self, agent_id: str, tvm_name: str) -> None:
        self.membership.tvm_left(agent_id, tvm_name)

    # ------------------------------------------------------------------ pools

    def vm_sizes(self) -> dict[str, tuple[int, int, int, str]]:
        return self.store.vm_sizes()

    def add_pool(self, req: m.PoolAdd) -> None:
        self.pool_area.add_pool(req)
        if req.enable_auto_scale:
            self.autoscale.pool_added(req.name)

    def provision_failed(self, pool: str, code: str, message: str) -> None:
        self.pool_area.provision_failed(pool, code, message)

    def delete_pool(self, name: str) -> None:
        self.pool_area.delete_pool(name)
        self.autoscale.pool_deleted(name)

    def get_pool(self, name: str) -> PoolRec:
        return self.store.get_pool(name)

    def resize_pool(self, name: str, req: m.PoolResize) -> None:
        self.pool_area.resize_pool(name, req)

    def update_pool(self, name: str, spec: m.PoolAdd) -> None:
        self.pool_area.update_pool(name, spec)

    def stop_resize(self, name: str) -> None:
        self.pool_area.stop_resize(name)

    def remove_tvms(self, name: str, req: m.TvmRemove) -> None:
        self.pool_area.remove_tvms(name, req)

    def pool_tvms(self, name: str) -> list[Tvm]:
        return self.store.pool_tvms(name)

    def get_tvm(self, pool: str, name: str) -> Tvm:
        return self.store.get_tvm(pool, name)

    def enable_autoscale(self, name: str, formula: str | None, interval_text: str | None) -> None:
        self.autoscale.enable_autoscale(name, formula, interval_text)

    def disable_autoscale(self, name: str) -> None:
        self.autoscale.disable_autoscale(name)

    def evaluate_autoscale(self, name: str, formula: str) -> RunRec:
        return self.autoscale.evaluate_autoscale(name, formula)

    # ------------------------------------------------------------------ TVMs

    def reboot_tvm(self, pool: str, name: str, req: m.TvmReboot | None = None) -> None:
        self.tvm_ops.reboot_tvm(pool, name, req)

    def reimage_tvm(self, pool: str, name: str, req: m.TvmReimage | None = None) -> None:
        self.tvm_ops.reimage_tvm(pool, name, req)
        self.jobprep.tvm_reimaged(name)

    def disable_scheduling(
        self, pool: str, name: str, req: m.TvmDisableScheduling | None = None
    ) -> None:
        self.tvm_ops.disable_scheduling(pool, name, req)

    def enable_scheduling(self, pool: str, name: str) -> None:
        self.tvm_ops.enable_scheduling(pool, name)

    def delete_tvm(self, pool: str, name: str, option: str = "requeue") -> None:
        self.tvm_ops.delete_tvm(pool, name, option)

    def add_tvm_user(self, pool: str, tvm_name: str, req: m.TvmUserAdd) -> TvmUserRec:
        return self.tvm_ops.add_tvm_user(pool, tvm_name, req)

    def delete_tvm_user(self, pool: str, tvm_name: str, user: str) -> None:
        self.tvm_ops.delete_tvm_user(pool, tvm_name, user)

    def record_node_user(self, pool: str, tvm_name: str, user: TvmUserRec) -> None:
        self.tvm_ops.record_node_user(pool, tvm_name, user)

    def forget_node_user(self, pool: str, tvm_name: str, name: str) -> None:
        self.tvm_ops.forget_node_user(pool, tvm_name, name)

    # ------------------------------------------------------------------ certificates

    def add_certificate(self, req: m.CertificateAdd) -> CertRec:
        return self.certs.add_certificate(req)

    def get_certificate(self, name: str) -> CertRec:
        return self.certs.get_certificate(name)

    def certificate_users(self, thumbprint: str) -> list[str]:
        return self.certs.certificate_users(thumbprint)

    def delete_certificate(self, name: str) -> None:
        self.certs.delete_certificate(name)

    # ------------------------------------------------------------------ workitems and jobs

    def add_workitem(self, req: m.WorkitemAdd) -> None:
        self.job_area.add_workitem(req)

    def get_workitem(self, name: str) -> WorkitemRec:
        return self.store.get_workitem(name)

    def update_workitem(self, name: str, req: m.WorkitemUpdate) -> None:
        self.job_area.update_workitem(name, req)

    def replace_workitem(self, name: str, req: m.WorkitemAdd) -> None:
        self.job_area.replace_workitem(name, req)

    def delete_workitem(self, name: str) -> None:
        self.job_area.delete_workitem(name)

    def terminate_workitem(self, name: str) -> None:
        self.job_area.terminate_workitem(name)

    def disable_workitem(self, name: str) -> None:
        self.job_area.disable_workitem(name)

    def enable_workitem(self, name: str) -> None:
        self.job_area.enable_workitem(name)

    def get_job(self, workitem: str, name: str) -> Job:
        return self.store.get_job(workitem, name)

    def workitem_jobs(self, workitem: str) -> list[Job]:
        return self.store.workitem_jobs(workitem)

    def update_job(self, workitem: str, name: str, req: m.JobUpdate) -> None:
        self.job_area.update_job(workitem, name, req)

    def terminate_job(self, workitem: str, name: str, reason: str | None = None) -> None:
        self.job_area.terminate_job(workitem, name, reason)

    def disable_job(self, workitem: str, name: str, option: str = "requeue") -> None:
        self.job_area.disable_job(workitem, name, option)

    def enable_job(self, workitem: str, name: str) -> None:
        self.job_area.enable_job(workitem, name)

    def delete_job(self, workitem: str, name: str) -> None:
        self.job_area.delete_job(workitem, name)

    def job_for_token(self, token: str) -> Job | None:
        return self.job_area.job_for_token(token)

    # ------------------------------------------------------------------ tasks

    def add_task(self, workitem: str, job_name: str, req: m.TaskAdd) -> None:
        self.tasks.add_task(workitem, job_name, req)

    def add_tasks(
        self, workitem: str, job_name: str, reqs: list[m.TaskAdd]
    ) -> list[m.TaskAddResult]:
        return self.tasks.add_tasks(workitem, job_name, reqs)

    def get_task(self, workitem: str, job_name: str, name: str) -> tuple[Job, TaskRec]:
        return self.store.get_task(workitem, job_name, name)

    def update_task(self, workitem: str, job_name: str, name: str, req: m.TaskUpdate) -> None:
        self.tasks.update_task(workitem, job_name, name, req)

    def terminate_task(self, workitem: str, job_name: str, name: str) -> None:
        self.tasks.terminate_task(workitem, job_name, name)

    def delete_task(self, workitem: str, job_name: str, name: str) -> None:
        self.tasks.delete_task(workitem, job_name, name)

    def reactivate_task(self, workitem: str, job_name: str, name: str) -> None:
        self.tasks.reactivate_task(workitem, job_name, name)

    def task_counts(self, job: Job) -> m.TaskCounts:
        return self.tasks.task_counts(job)

    def job_prep_status(self, workitem: str, name: str) -> list[JobPrepRec]:
        """Where the job's preparation task ran, and its release task (409 if it has neither)."""
        return self.jobprep.status(self.store.get_job(workitem, name))
