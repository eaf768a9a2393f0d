"""Pools, TVM allocation, shrinking, TVM operations and auto pools (part of the pure core; see state.py).

TVM life in the coordinator (reference §2.2): `starting` when an agent is given to a pool,
`waitingforstarttask` while a start task with waitForSuccess runs, then `idle`/`running`, or
`starttaskfailed`. Operations that must first deal with running tasks (remove, reboot, reimage,
disable scheduling) take a deallocation option: `requeue` kills and requeues at once, `terminate` kills
and completes the tasks with a failure, `taskcompletion` waits — the TVM records the operation in
`pending_op` and `_advance_tvm_ops` carries it out once nothing runs there any more. A leaving TVM
keeps its record (`leavingpool`, pending_op "leaving") until its agent reports `TvmLeft` (directories
wiped), so the agent is back in the free inventory only when it is clean.
"""

from __future__ import annotations

import secrets

import msgspec

from protocol import messages as pm

from . import models as m
from ._core_base import WALL_CLOCK_EXIT_CODE, CoreBase
from ._pool_limits import check_pool_limits, join_limits
from .errors import ApiError, bad_request, conflict, not_found
from .records import (
    COMPLETED,
    RUNNING,
    VM_SIZES,
    AgentInfo,
    PoolRec,
    Tvm,
    TvmRec,
)
from .timeutil import parse_duration
from .validation import check_env, check_name, check_range

DEALLOCATION_OPTIONS = ("requeue", "terminate", "taskcompletion")
MAX_REMOVE = 100
# A provisioner request not answered by new agents within this time is asked again.
PROVISION_PATIENCE_S = 60.0
# Operations on a TVM and the states they are refused in (reference §2.2).
_BUSY_CODES = {
    "rebooting": "TVMBeingRebooted",
    "reimaging": "TVMBeingReimaged",
    "leavingpool": "TVMLeavingPool",
    "starting": "TVMNotReady",
    "creating": "TVMNotReady",
    "unknown": "TVMStateUnknown",
}


def _native_size_name(cores: int, memory_bytes: int) -> str:
    return f"native-{cores}c-{memory_bytes // (1024 * 1024)}m"


class PoolsMixin(CoreBase):
    # Set by the shell when a provisioner is configured; class defaults keep CoreBase.__init__ untouched.
    provisioning_enabled: bool = False
    provision_pending: int = 0
    _provision_deadline: float = 0.0

    # ------------------------------------------------------------------ VM sizes

    def vm_sizes(self) -> dict[str, tuple[int, int, int, str]]:
        """name -> (cores, memory MiB, disk GiB, source): built-ins plus each agent's real size."""
        sizes = {k: (*v, "builtin") for k, v in VM_SIZES.items()}
        for a in self.agents.values():
            if a.memory_bytes > 0:
                name = _native_size_name(a.cores, a.memory_bytes)
                sizes.setdefault(name, (a.cores, a.memory_bytes // (1024 * 1024), 0, "agent"))
        return sizes

    def _size_of(self, pool: PoolRec) -> tuple[int, int, int, str] | None:
        builtin = VM_SIZES.get(pool.spec.vm_size)
        if builtin is not None:  # the common case, without a pass over every agent
            return (*builtin, "builtin")
        return self.vm_sizes().get(pool.spec.vm_size)

    # ------------------------------------------------------------------ pools

    def _check_pool_spec(self, req: m.PoolAdd, prefix: str = "") -> tuple[m.PoolAdd, float]:
        """Validate a pool spec (user pool or auto pool); returns the normalised spec and resize timeout."""
        sizes = self.vm_sizes()
        size = sizes.get(req.vm_size.lower())
        if size is None:
            raise bad_request("InvalidVmSize", f"unknown {prefix}vmSize {req.vm_size!r}; known sizes: "
                              + ", ".join(sizes), field=prefix + "vmSize")
        check_range(req.target_dedicated, 0, self.max_pool_size, prefix + "targetDedicated")
        if req.max_tasks_per_vm < 1 or req.max_tasks_per_vm > 4 * size[0]:
            raise bad_request("InvalidPropertyValue",
                              f"{prefix}maxTasksPerVM must be between 1 and {4 * size[0]} (4 x the {size[0]} "
                              f"core(s) of vmSize {req.vm_size!r}), got {req.max_tasks_per_vm}",
                              field=prefix + "maxTasksPerVM")
        if req.tvm_fill_type.lower() not in ("pack", "spread"):
            raise bad_request("InvalidPropertyValue", f"{prefix}tvmFillType must be 'pack' or 'spread'",
                              field=prefix + "tvmFillType")
        timeout = parse_duration(req.resize_timeout, prefix + "resizeTimeout") if req.resize_timeout else 900.0
        if req.start_task is not None:
            if not req.start_task.command_line.strip():
                raise bad_request("MissingRequiredProperty", f"{prefix}startTask.commandLine must not be empty",
                                  field=prefix + "startTask.commandLine")
            check_env(req.start_task.environment_settings, prefix + "startTask.environmentSettings")
            self._check_files(req.start_task.resource_files, prefix + "startTask.resourceFiles")  # type: ignore[attr-defined]
            check_range(req.start_task.max_task_retry_count, -1, 1000, prefix + "startTask.maxTaskRetryCount")
        check_pool_limits(req, prefix)
        cert_refs = self._check_certificate_references(req.certificate_references, prefix)  # type: ignore[attr-defined]
        spec = msgspec.structs.replace(req, tvm_fill_type=req.tvm_fill_type.lower(), vm_size=req.vm_size.lower(),
                                       certificate_references=cert_refs)
        return spec, timeout

    def add_pool(self, req: m.PoolAdd) -> None:
        check_name(req.name)
        if req.name.lower() in (n.lower() for n in self.pools):
            raise conflict("pool", req.name)
        spec, timeout = self._check_pool_spec(req)
        self._create_pool(spec, timeout)

    def _create_pool(self, spec: m.PoolAdd, timeout: float, **auto: object) -> PoolRec:
        now = self.clock()
        rec = PoolRec(spec=spec, created=now, target=spec.target_dedicated, resize_timeout_s=timeout,
                      state_time=now, alloc_time=now, **auto)  # type: ignore[arg-type]
        self.pools[spec.name] = rec
        self._put("pool", spec.name, rec)
        self._allocate()
        return rec

    def get_pool(self, name: str) -> PoolRec:
        pool = self.pools.get(name)
        if pool is None:
            raise not_found("pool", name)
        return pool

    def _active_pool(self, name: str) -> PoolRec:
        pool = self.get_pool(name)
        if pool.state == "deleting":
            raise ApiError(409, "PoolBeingDeleted", f"pool {name!r} is being deleted", name=name)
        return pool

    def delete_pool(self, name: str) -> None:
        """Stop any resize, remove every TVM with requeue, then drop the pool (reference §2.1)."""
        pool = self.get_pool(name)
        if pool.state == "deleting":
            return  # repeated delete: already under way
        now = self.clock()
        pool.state = "deleting"
        pool.state_time = now
        pool.target = 0
        pool.alloc_state = "steady"
        pool.resize_started = None
        self._put("pool", name, pool)
        for tvm in [t for t in self.tvms.values() if t.rec.pool == name]:
            self._begin_leave(tvm, "requeue", "pool deleted")
        self._finish_pool_delete(name)

    def _finish_pool_delete(self, name: str) -> None:
        pool = self.pools.get(name)
        if pool is None or pool.state != "deleting":
            return
        if any(t.rec.pool == name for t in self.tvms.values()):
            return
        del self.pools[name]
        self._delete("pool", name)

    def resize_pool(self, name: str, req: m.PoolResize) -> None:
        pool = self._active_pool(name)
        if pool.spec.enable_auto_scale:
            raise ApiError(409, "AutoScaleEnabled", f"pool {name!r} has autoscale enabled; disable it to resize")
        if pool.alloc_state != "steady":
            raise ApiError(409, "PoolBeingResized", f"pool {name!r} is {pool.alloc_state}; resize it again when "
                           "it is steady (or stop the resize first)")
        check_range(req.target_dedicated, 0, self.max_pool_size, "targetDedicated")
        option = self._check_option(req.tvm_deallocation_option, "tvmDeallocationOption")
        timeout = parse_duration(req.resize_timeout, "resizeTimeout") if req.resize_timeout else None
        if timeout is not None:
            pool.resize_timeout_s = timeout
        pool.target = req.target_dedicated
        pool.shrink_option = option
        pool.resize_error = None
        self._put("pool", name, pool)
        self._allocate()

    def stop_resize(self, name: str) -> None:
        """Keep whatever TVMs exist now (no rollback); the pool goes steady."""
        pool = self._active_pool(name)
        if pool.alloc_state != "resizing":
            raise ApiError(409, "PoolNotResizing", f"pool {name!r} is {pool.alloc_state}, not resizing")
        now = self.clock()
        pool.target = len(self._members(name))
        pool.alloc_state = "stopping"
        pool.alloc_time = now
        pool.resize_started = None
        pool.resize_error = ("ResizeStopped", "The resize was stopped by the user")
        self._put("pool", name, pool)
        self._allocate()

    def remove_tvms(self, name: str, req: m.TvmRemove) -> None:
        pool = self._active_pool(name)
        if pool.alloc_state != "steady":
            raise ApiError(409, "PoolBeingResized", f"pool {name!r} is {pool.alloc_state}; remove TVMs when it is "
                           "steady")
        if not req.tvm_names:
            raise bad_request("MissingRequiredProperty", "tvmNames must name at least one TVM", field="tvmNames")
        if len(req.tvm_names) > MAX_REMOVE:
            raise bad_request("TooManyTvms", f"at most {MAX_REMOVE} TVMs per call, got {len(req.tvm_names)}",
                              field="tvmNames")
        option = self._check_option(req.tvm_deallocation_option, "tvmDeallocationOption")
        timeout = parse_duration(req.resize_timeout, "resizeTimeout") if req.resize_timeout else None
        victims: list[Tvm] = []
        for tvm_name in dict.fromkeys(req.tvm_names):
            tvm = self.tvms.get(tvm_name)
            if tvm is None:
                raise not_found("tvm", tvm_name)
            if tvm.rec.pool != name:
                raise bad_request("TVMNotInPool", f"TVM {tvm_name!r} belongs to pool {tvm.rec.pool!r}, not {name!r}",
                                  field="tvmNames", name=tvm_name)
            if tvm.rec.pending_op in ("leave", "leaving"):
                raise ApiError(409, "TVMLeavingPool", f"TVM {tvm_name!r} is already leaving the pool", name=tvm_name)
            victims.append(tvm)
        if timeout is not None:
            pool.resize_timeout_s = timeout
        pool.target = max(0, len(self._members(name)) - len(victims))
        pool.resize_error = None
        self._put("pool", name, pool)
        for tvm in victims:
            self._begin_leave(tvm, option, "removed from the pool")
        self._allocate()

    def _check_option(self, option: str, field: str) -> str:
        value = (option or "requeue").lower()
        if value not in DEALLOCATION_OPTIONS:
            raise bad_request("InvalidPropertyValue", f"{field} must be requeue, terminate or taskcompletion, "
                              f"got {option!r}", field=field)
        return value

    def pool_tvms(self, name: str) -> list[Tvm]:
        self.get_pool(name)
        return sorted((t for t in self.tvms.values() if t.rec.pool == name), key=lambda t: t.rec.name)

    def get_tvm(self, pool: str, name: str) -> Tvm:
        self.get_pool(pool)
        tvm = self.tvms.get(name)
        if tvm is None or tvm.rec.pool != pool:
            raise not_found("tvm", name)
        return tvm

    def _members(self, pool: str) -> list[Tvm]:
        """TVMs that count towards the pool's size (not those on their way out)."""
        return [t for t in self.tvms.values()
                if t.rec.pool == pool and t.rec.pending_op not in ("leave", "leaving")]

    # ------------------------------------------------------------------ TVM operations

    def _tvm_for_op(self, pool: str, name: str, allowed: tuple[str, ...]) -> Tvm:
        self._active_pool(pool)
        tvm = self.get_tvm(pool, name)
        if tvm.rec.pending_op in ("leave", "leaving"):
            raise ApiError(409, "TVMLeavingPool", f"TVM {name!r} is leaving the pool", name=name)
        if tvm.rec.state not in allowed:
            code = _BUSY_CODES.get(tvm.rec.state, "TVMInvalidState")
            raise ApiError(409, code, f"TVM {name!r} is {tvm.rec.state}; this operation needs one of: "
                           + ", ".join(allowed), name=name, state=tvm.rec.state)
        return tvm

    def reboot_tvm(self, pool: str, name: str, req: m.TvmReboot | None = None) -> None:
        self._restart_tvm(pool, name, (req or m.TvmReboot()).tvm_reboot_option, "tvmRebootOption", False)

    def reimage_tvm(self, pool: str, name: str, req: m.TvmReimage | None = None) -> None:
        self._restart_tvm(pool, name, (req or m.TvmReimage()).tvm_reimage_option, "tvmReimageOption", True)

    def _restart_tvm(self, pool: str, name: str, option: str, field: str, reimage: bool) -> None:
        tvm = self._tvm_for_op(pool, name, ("idle", "running", "offline", "starttaskfailed", "waitingforstarttask",
                                            "unusable"))
        option = self._check_option(option, field)
        op = "reimage" if reimage else "reboot"
        self._set_tvm_state(tvm, "reimaging" if reimage else "rebooting")
        tvm.rec.pending_op = op
        tvm.rec.pending_option = option
        self._put("tvm", name, tvm.rec)
        if option != "taskcompletion":
            self._evict_tasks(tvm, option, f"TVM {op}")
        self._advance_tvm(tvm)

    def disable_scheduling(self, pool: str, name: str, req: m.TvmDisableScheduling | None = None) -> None:
        tvm = self._tvm_for_op(pool, name, ("idle", "running", "offline", "starttaskfailed", "waitingforstarttask",
                                            "unusable"))
        option = self._check_option((req or m.TvmDisableScheduling()).tvm_disable_scheduling_option,
                                    "tvmDisableSchedulingOption")
        if tvm.rec.scheduling == "disabled":
            raise ApiError(409, "TVMAlreadyInTargetSchedulingState", f"scheduling on TVM {name!r} is already disabled",
                           name=name)
        tvm.rec.scheduling = "disabled"
        if tvm.rec.state in ("idle", "running"):
            if option != "taskcompletion":
                self._evict_tasks(tvm, option, "scheduling disabled on the TVM")
            tvm.rec.pending_op = "offline"
            tvm.rec.pending_option = option
        self._put("tvm", name, tvm.rec)
        self._advance_tvm(tvm)

    def enable_scheduling(self, pool: str, name: str) -> None:
        self._active_pool(pool)
        tvm = self.get_tvm(pool, name)
        if tvm.rec.scheduling == "enabled":
            raise ApiError(409, "TVMAlreadyInTargetSchedulingState", f"scheduling on TVM {name!r} is already enabled",
                           name=name)
        tvm.rec.scheduling = "enabled"
        if tvm.rec.pending_op == "offline":
            tvm.rec.pending_op = ""
        if tvm.rec.state == "offline":
            self._set_tvm_state(tvm, "running" if tvm.running else "idle")
        self._put("tvm", name, tvm.rec)

    def delete_tvm(self, pool: str, name: str, option: str = "requeue") -> None:
        """Remove one TVM (the pool's target shrinks by one); what ran there is requeued by default."""
        self._active_pool(pool)
        self.get_tvm(pool, name)
        self.remove_tvms(pool, m.TvmRemove(tvm_names=[name], tvm_deallocation_option=option))

    def _evict_tasks(self, tvm: Tvm, option: str, reason: str) -> None:
        """Kill what runs on the TVM: requeue it, or complete it with a failure (terminate)."""
        for key, task in tvm.running.items():
            self._send(tvm.rec.agent_id, pm.CancelTask(key=key, attempt=task.attempt, reason=reason))
        if option == "requeue":
            self._requeue_tvm_tasks(tvm)
            return
        now = self.clock()
        for key, task in list(tvm.running.items()):
            job = self.jobs.get(key.rpartition("/")[0])
            if job is None or task.state != RUNNING:
                continue
            task.prev_state = RUNNING
            task.state = COMPLETED
            task.state_time = now
            task.end_time = now
            task.exit_code = WALL_CLOCK_EXIT_CODE
            task.failure = ("ServerError", "TaskEnded", f"the task was terminated: {reason}")
            self._put_task(job, task)
        tvm.running.clear()

    def _begin_leave(self, tvm: Tvm, option: str, reason: str) -> None:
        if tvm.rec.pending_op in ("leave", "leaving"):
            return
        self._set_tvm_state(tvm, "leavingpool")
        tvm.rec.pending_op = "leave"
        tvm.rec.pending_option = option
        self._put("tvm", tvm.rec.name, tvm.rec)
        if option != "taskcompletion":
            self._evict_tasks(tvm, option, reason)
        self._advance_tvm(tvm)

    def _advance_tvm_ops(self) -> None:
        if self.recovering_until is not None:
            return  # running tasks are not known until the agents report them: nothing has "ended" yet
        for tvm in list(self.tvms.values()):
            if tvm.rec.pending_op in ("leave", "reboot", "reimage", "offline"):
                self._advance_tvm(tvm)

    def _advance_tvm(self, tvm: Tvm) -> None:
        """Carry out the TVM's pending operation once no task runs there."""
        op = tvm.rec.pending_op
        if not op or op == "leaving" or tvm.running:
            return
        rec = tvm.rec
        if op == "leave":
            rec.pending_op = "leaving"
            self._put("tvm", rec.name, rec)
            agent = self.agents.get(rec.agent_id)
            if agent is None or not agent.connected:
                self._forget_tvm(tvm)  # nobody to wipe it now; the agent is told when it comes back
                return
            self._send(rec.agent_id, pm.LeavePool(tvm_name=rec.name, reason="removed from the pool"))
        elif op in ("reboot", "reimage"):
            rec.pending_op = ""
            rec.pending_option = ""
            tvm.ready = False
            rec.start_task = None
            self._put("tvm", rec.name, rec)
            pool = self.pools.get(rec.pool)
            self._send(rec.agent_id, pm.RebootTvm(tvm_name=rec.name, reimage=op == "reimage"))
            if pool is not None:
                self._send(rec.agent_id, self._join_msg(pool, tvm))
        elif op == "offline":
            rec.pending_op = ""
            rec.pending_option = ""
            if rec.state in ("idle", "running"):
                self._set_tvm_state(tvm, "offline")
            self._put("tvm", rec.name, rec)

    def tvm_left(self, agent_id: str, tvm_name: str) -> None:
        """The agent wiped the TVM: forget it, the agent is free again."""
        tvm = self.tvms.get(tvm_name)
        if tvm is not None and tvm.rec.agent_id == agent_id and tvm.rec.pending_op == "leaving":
            self._forget_tvm(tvm)

    def _forget_tvm(self, tvm: Tvm) -> None:
        self._requeue_tvm_tasks(tvm)
        name = tvm.rec.name
        self.tvms.pop(name, None)
        self._delete("tvm", name)
        self._members_changed(tvm.rec.pool)  # type: ignore[attr-defined]  # issue 8
        agent = self.agents.get(tvm.rec.agent_id)
        if agent is not None and agent.tvm == name:
            agent.tvm = None
        self._finish_pool_delete(tvm.rec.pool)
        self._allocate()

    # ------------------------------------------------------------------ allocation

    def _allocate(self) -> None:
        """Give free agents to pools below target; take TVMs back from pools above it; ask the
        provisioner for agents still missing."""
        now = self.clock()
        free = sorted(
            (a for a in self.agents.values() if a.connected and a.tvm is None), key=lambda a: a.agent_id
        )
        missing: list[tuple[int, str]] = []
        for name, pool in sorted(self.pools.items(), key=lambda kv: kv[1].created):
            if pool.state != "active":
                continue
            members = self._members(name)
            current = len(members)
            # After a timeout or stop the pool stays as it is until the next resize.
            growing = pool.resize_error is None
            while growing and current < pool.target and free:
                self._join(pool, free.pop(0), now)
                current += 1
            if current > pool.target:
                # Shrink: job-manager TVMs last, then idle before busy.
                def order(t: Tvm) -> tuple[bool, int, bool, str]:
                    return (any(x.job_manager for x in t.running.values()), len(t.running),
                            t.rec.state in ("idle", "running"), t.rec.name)

                for tvm in sorted(members, key=order)[: current - pool.target]:
                    self._begin_leave(tvm, pool.shrink_option, "pool resized")
                current = pool.target
            if growing and current < pool.target:
                missing.append((pool.target - current, pool.spec.vm_size))
            leaving = any(t.rec.pool == name and t.rec.pending_op in ("leave", "leaving") for t in self.tvms.values())
            want = "resizing" if growing and (current != pool.target or leaving) else "steady"
            if want != pool.alloc_state:
                pool.alloc_state = want
                pool.alloc_time = now
                pool.resize_started = now if want == "resizing" else None
                self._put("pool", name, pool)
        self._provision(missing, now)

    def _provision(self, missing: list[tuple[int, str]], now: float) -> None:
        if not self.provisioning_enabled:
            return
        if self.provision_pending and now >= self._provision_deadline:
            self.provision_pending = 0  # the last request went unanswered: ask again
        wanted = sum(n for n, _ in missing)
        extra = wanted - self.provision_pending
        if extra <= 0:
            return
        # One request per size, in pool order, for the agents not already asked for.
        for n, size in missing:
            take = min(n, extra)
            if take > 0:
                self._fx.provision.append((take, size))  # type: ignore[attr-defined]
                extra -= take
        self.expect_agents(wanted - self.provision_pending)

    def expect_agents(self, n: int) -> None:
        """`n` agents were asked for (here or by the shell at start-up): count them as on their way."""
        self.provision_pending += n
        self._provision_deadline = self.clock() + PROVISION_PATIENCE_S

    def _agent_registered(self) -> None:
        """A never-seen agent said hello: one fewer agent to wait for from the provisioner."""
        if self.provision_pending > 0:
            self.provision_pending -= 1

    def _join(self, pool: PoolRec, agent: AgentInfo, now: float) -> None:
        name = f"tvm-{secrets.token_hex(5)}"
        rec = TvmRec(name=name, pool=pool.spec.name, agent_id=agent.agent_id, created=now,
                     state="starting", state_time=now, ip=agent.ip)
        tvm = Tvm(rec, pool.spec.max_tasks_per_vm)
        self.tvms[name] = tvm
        agent.tvm = name
        self._assign_ports(pool, tvm)  # type: ignore[attr-defined]  # issue 8
        self._put("tvm", name, rec)
        self._send(agent.agent_id, self._join_msg(pool, tvm))
        self._members_changed(pool.spec.name)  # type: ignore[attr-defined]  # issue 8

    def _join_msg(self, pool: PoolRec, tvm: Tvm) -> pm.JoinPool:
        st = pool.spec.start_task
        start = None
        if st is not None:
            start = pm.StartTaskSpec(
                command_line=st.command_line,
                env={e.name: e.value for e in st.environment_settings},
                resource_files=[self._rf(r) for r in st.resource_files],  # type: ignore[attr-defined]
                max_task_retry_count=st.max_task_retry_count,
                wait_for_success=st.wait_for_success,
                run_elevated=st.run_elevated,
            )
        size = self._size_of(pool)
        memory = size[1] * 1024 * 1024 if size else 0
        return pm.JoinPool(pool=pool.spec.name, tvm_name=tvm.rec.name, account=self.account,
                           account_url=self.account_url, slots=tvm.slots, start_task=start,
                           memory_limit_bytes=memory,
                           certificates=self._cert_files(pool),  # type: ignore[attr-defined]  # issue 8
                           port_range_low=tvm.rec.port_low, port_range_high=tvm.rec.port_high,
                           bubblewrap=pool.spec.bubblewrap, **join_limits(pool.spec))

    def _set_tvm_state(self, tvm: Tvm, state: str) -> None:
        if tvm.rec.state != state:
            tvm.rec.state = state
            tvm.rec.state_time = self.clock()
            self._put("tvm", tvm.rec.name, tvm.rec)

    def _requeue_tvm_tasks(self, tvm: Tvm) -> None:
        for key, task in list(tvm.running.items()):
            job = self.jobs.get(key.rpartition("/")[0])
            if job is not None and task.state == RUNNING:
                self._requeue(job, task)
        tvm.running.clear()

    # ------------------------------------------------------------------ auto pools

    def _check_auto_pool(self, env: m.JobExecutionEnvironment, workitem: str) -> tuple[m.PoolAdd, float, str, bool]:
        """Validate jobExecutionEnvironment.autoPoolSpecification; returns (spec without name, timeout,
        lifetime, keepAlive). The pool itself is made by `_ensure_auto_pool` once validation passed."""
        field = "jobExecutionEnvironment.autoPoolSpecification"
        spec = env.auto_pool_specification
        if env.pool_name:
            raise bad_request("InvalidPropertyValue", f"give jobExecutionEnvironment.poolName or {field}, not both",
                              field=field)
        if not isinstance(spec, dict):
            raise bad_request("InvalidPropertyValue", f"{field} must be an object", field=field)
        unknown = set(spec) - {"poolLifetimeOption", "keepAlive", "pool", "autoPoolNamePrefix"}
        if unknown:
            raise bad_request("InvalidPropertyValue", f"{field} has unknown field(s): {', '.join(sorted(unknown))}",
                              field=field)
        lifetime = spec.get("poolLifetimeOption")
        if lifetime not in ("job", "workitem"):
            raise bad_request("InvalidPropertyValue", f"{field}.poolLifetimeOption must be 'job' or 'workitem'",
                              field=field + ".poolLifetimeOption")
        keep = spec.get("keepAlive", False)
        if not isinstance(keep, bool):
            raise bad_request("InvalidPropertyValue", f"{field}.keepAlive must be true or false",
                              field=field + ".keepAlive")
        prefix = spec.get("autoPoolNamePrefix", "")
        if prefix:
            check_name(prefix, field + ".autoPoolNamePrefix")
            if len(prefix) > 40:
                raise bad_request("InvalidPropertyValue", f"{field}.autoPoolNamePrefix is longer than 40 characters",
                                  field=field + ".autoPoolNamePrefix")
        body = spec.get("pool")
        if not isinstance(body, dict):
            raise bad_request("MissingRequiredProperty", f"{field}.pool (the pool's properties) is required",
                              field=field + ".pool")
        if "name" in body:
            raise bad_request("InvalidPropertyValue", f"{field}.pool must not have a name: the service names it",
                              field=field + ".pool.name")
        try:
            req = msgspec.convert({**body, "name": prefix or "auto"}, m.PoolAdd)
        except msgspec.ValidationError as exc:
            raise bad_request("InvalidPropertyValue", f"{field}.pool: {exc}", field=field + ".pool") from None
        checked, timeout = self._check_pool_spec(req, field + ".pool.")
        return checked, timeout, lifetime, keep

    def _ensure_auto_pool(self, checked: tuple[m.PoolAdd, float, str, bool], workitem: str, job: str) -> str:
        """Create (or, for lifetime 'workitem', reuse) the auto pool of a new job; returns its name."""
        spec, timeout, lifetime, keep = checked
        owner = workitem if lifetime == "workitem" else f"{workitem}/{job}"
        for name, pool in self.pools.items():
            if pool.auto_owner == owner and pool.state == "active":
                return name
        prefix = spec.name if spec.name != "auto" else "auto"
        name = f"{prefix}-{secrets.token_hex(6)}"
        self._create_pool(msgspec.structs.replace(spec, name=name), timeout, auto_owner=owner,
                          auto_lifetime=lifetime, keep_alive=keep)
        return name

    def _job_pool(self, wi: object, job_name: str) -> str:
        """The pool a new job of workitem `wi` runs on: its poolName, or its auto pool (made here)."""
        env = wi.spec.job_execution_environment  # type: ignore[attr-defined]
        if env.auto_pool_specification is None:
            return env.pool_name or ""
        try:
            checked = self._check_auto_pool(env, wi.spec.name)  # type: ignore[attr-defined]
        except ApiError:
            # Validated when the workitem was added; a later job (schedule) may meet a changed catalogue
            # (an agent's native size gone). Never fail inside a tick: take the spec as it is.
            spec = env.auto_pool_specification
            req = msgspec.convert({**spec["pool"], "name": spec.get("autoPoolNamePrefix") or "auto"}, m.PoolAdd)
            checked = (req, 900.0, spec["poolLifetimeOption"], bool(spec.get("keepAlive", False)))
        return self._ensure_auto_pool(checked, wi.spec.name, job_name)  # type: ignore[attr-defined]

    def _release_auto_pools(self) -> None:
        """Delete auto pools whose job or workitem has ended (unless keepAlive)."""
        for name, pool in list(self.pools.items()):
            if not pool.auto_owner or pool.keep_alive or pool.state != "active":
                continue
            if pool.auto_lifetime == "job":
                job = self.jobs.get(pool.auto_owner)
                ended = job is None or job.rec.state in ("completed", "deleting")
            else:
                wi = self.workitems.get(pool.auto_owner)
                ended = wi is None or wi.state in ("completed", "deleting")
            if ended:
                self.delete_pool(name)
