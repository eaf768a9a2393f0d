"""Pools, TVM allocation and shrinking (part of the pure core; see state.py)."""

from __future__ import annotations

import secrets

import msgspec

from protocol import messages as pm

from . import models as m
from ._core_base import CoreBase
from .errors import ApiError, bad_request, conflict, not_found
from .records import (
    ACTIVE,
    RUNNING,
    VM_SIZES,
    AgentInfo,
    PoolRec,
    Tvm,
    TvmRec,
)
from .timeutil import parse_duration
from .validation import check_env, check_name, check_range


class PoolsMixin(CoreBase):
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
