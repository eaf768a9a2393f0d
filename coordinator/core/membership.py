"""Pool membership: free agents joining pools as TVMs, TVMs leaving them, port blocks and the
member lists of communicating pools.

TVM life in the coordinator (reference §2.2): `starting` when an agent is given to a pool,
`waitingforstarttask` while a start task with waitForSuccess runs, then `idle`/`running`, or
`starttaskfailed`. Operations that must first deal with running tasks (remove, reboot, reimage,
disable scheduling) take a deallocation option: `requeue` kills and requeues at once, `terminate` kills
and completes the tasks with a failure, `taskcompletion` waits — the TVM records the operation in
`pending_op` and `advance_all` carries it out once nothing runs there any more. A leaving TVM
keeps its record (`leavingpool`, pending_op "leaving") until its agent reports `TvmLeft` (directories
wiped), so the agent is back in the free inventory only when it is clean.

Port blocks: a `communication` pool's TVM gets block `i` of the coordinator-wide `PortRangeConfig`.
Blocks are allocated across ALL pools, not per pool, so TVMs of two pools backed by agents on the
same host never share ports. The block is journaled on the TVM. Every time a communicating pool
gains or loses a TVM, each of its TVMs gets `PoolMembers` (the member addresses) so its agent can
refresh its nftables set / user-space gate.
"""

from __future__ import annotations

import secrets

from protocol import messages as pm
from protocol.ports import allocate_tvm_range

from . import usage
from .freeslots import queue_depth
from .instructions import Outbox
from .pool_limits import join_limits
from .records import COMPLETED, RUNNING, AgentInfo, PoolRec, Tvm, TvmRec
from .runs import Runs
from .specs import WALL_CLOCK_EXIT_CODE, cert_key, ref_thumb, resource_file
from .states import AllocState, move_alloc, move_task
from .store import Store

# A provisioner request not answered by new agents within this time is asked again.
PROVISION_PATIENCE_S = 60.0


class Membership:
    def __init__(self, store: Store, out: Outbox, runs: Runs) -> None:
        self.s = store
        self.out = out
        self.runs = runs

    # ------------------------------------------------------------------ joining

    def allocate(self) -> None:
        """Give free agents to pools below target; take TVMs back from pools above it; ask the
        provisioner for agents still missing."""
        s = self.s
        now = s.clock()
        free = sorted(
            (a for a in s.agents.values() if a.connected and a.tvm is None),
            key=lambda a: a.agent_id,
        )
        missing: list[tuple[int, str, str]] = []
        for name, pool in sorted(s.pools.items(), key=lambda kv: kv[1].created):
            if pool.state != "active":
                continue
            members = s.members(name)
            current = len(members)
            # After a timeout or stop the pool stays as it is until the next resize.
            growing = pool.resize_error is None
            while growing and current < pool.target and free:
                agent = self._take_free(free, pool)
                if agent is None:
                    break
                self.join(pool, agent, now)
                current += 1
            if current > pool.target:
                # Shrink: job-manager TVMs last, then idle before busy.
                def order(t: Tvm) -> tuple[bool, int, bool, str]:
                    return (
                        any(x.job_manager for x in t.running.values()),
                        len(t.running),
                        t.rec.state in ("idle", "running"),
                        t.rec.name,
                    )

                for tvm in sorted(members, key=order)[: current - pool.target]:
                    self.begin_leave(tvm, pool.shrink_option, "pool resized")
                current = pool.target
            if growing and current < pool.target:
                missing.append((pool.target - current, pool.spec.vm_size, name))
            leaving = any(
                t.rec.pool == name and t.rec.pending_op in ("leave", "leaving")
                for t in s.tvms.values()
            )
            want: AllocState = (
                "resizing" if growing and (current != pool.target or leaving) else "steady"
            )
            if want != pool.alloc_state:
                move_alloc(pool, want)
                pool.alloc_time = now
                pool.resize_started = now if want == "resizing" else None
                self.out.put("pool", name, pool)
        self._provision(missing, now)

    def _take_free(self, free: list[AgentInfo], pool: PoolRec) -> AgentInfo | None:
        """The first free agent this pool may take: with named provisioners, only one of the
        pool's own provisioner (or, for a pool naming none, one of no named provisioner)."""
        if not self.s.provisioner_names:
            return free.pop(0)
        owner = self.s.pool_owner(pool)
        for i, agent in enumerate(free):
            if self.s.agent_owner(agent.agent_id) == owner:
                return free.pop(i)
        return None

    def _provision(self, missing: list[tuple[int, str, str]], now: float) -> None:
        s = self.s
        if not s.provisioning_enabled:
            return
        if s.provision_pending and now >= s.provision_deadline:
            s.provision_pending = 0  # the last request went unanswered: ask again
        wanted = sum(n for n, _, _ in missing)
        extra = wanted - s.provision_pending
        if extra <= 0:
            return
        # One request per size, in pool order, for the agents not already asked for.
        for n, size, pool in missing:
            take = min(n, extra)
            if take > 0:
                self.out.provision(take, size, pool)
                extra -= take
        self.expect_agents(wanted - s.provision_pending)

    def expect_agents(self, n: int) -> None:
        """`n` agents were asked for (here or by the shell at start-up): count them as on their way."""
        self.s.provision_pending += n
        self.s.provision_deadline = self.s.clock() + PROVISION_PATIENCE_S

    def agent_registered(self) -> None:
        """A never-seen agent said hello: one fewer agent to wait for from the provisioner."""
        if self.s.provision_pending > 0:
            self.s.provision_pending -= 1

    def join(self, pool: PoolRec, agent: AgentInfo, now: float) -> None:
        name = f"tvm-{secrets.token_hex(5)}"
        rec = TvmRec(
            name=name,
            pool=pool.spec.name,
            agent_id=agent.agent_id,
            created=now,
            state="starting",
            state_time=now,
            ip=agent.ip,
        )
        tvm = Tvm(rec, pool.spec.max_tasks_per_vm)
        tvm.queue = queue_depth(tvm.slots, agent.capabilities)
        self.s.tvms[name] = tvm
        agent.tvm = name
        self.assign_ports(pool, tvm)
        self.out.put("tvm", name, rec)
        self.out.send(agent.agent_id, self.join_msg(pool, tvm))
        self.members_changed(pool.spec.name)

    def join_msg(self, pool: PoolRec, tvm: Tvm) -> pm.JoinPool:
        st = pool.spec.start_task
        start = None
        if st is not None:
            start = pm.StartTaskSpec(
                command_line=st.command_line,
                env={e.name: e.value for e in st.environment_settings},
                resource_files=[resource_file(r) for r in st.resource_files],
                max_task_retry_count=st.max_task_retry_count,
                wait_for_success=st.wait_for_success,
                run_elevated=st.run_elevated,
            )
        size = self.s.size_of(pool)
        memory = size[1] * 1024 * 1024 if size else 0
        return pm.JoinPool(
            pool=pool.spec.name,
            tvm_name=tvm.rec.name,
            account=self.s.account,
            account_url=self.s.account_url,
            slots=tvm.slots,
            start_task=start,
            memory_limit_bytes=memory,
            certificates=self.cert_files(pool),
            port_range_low=tvm.rec.port_low,
            port_range_high=tvm.rec.port_high,
            bubblewrap=pool.spec.bubblewrap,
            **join_limits(pool.spec),
        )

    def cert_files(self, pool: PoolRec) -> list[pm.CertFile]:
        """The certificates a pool references (raw bytes + password): the agent installs them
        before the start task and tasks."""
        files = []
        for ref in pool.spec.certificate_references:
            rec = self.s.certificates.get(cert_key(ref_thumb(ref)))
            if rec is not None:
                files.append(
                    pm.CertFile(
                        thumbprint=rec.thumbprint,
                        thumbprint_algorithm=rec.thumbprint_algorithm,
                        certificate_format=rec.certificate_format,
                        data=rec.data,
                        password=rec.password,
                    )
                )
        return files

    # ------------------------------------------------------------------ port blocks and members

    def assign_ports(self, pool: PoolRec, tvm: Tvm) -> None:
        """Give a new TVM of a communicating pool the lowest free block (global across pools)."""
        if not pool.spec.communication or tvm.rec.port_low:
            return
        cfg = self.s.port_range
        used = {
            (t.rec.port_low - cfg.low) // cfg.per_tvm
            for t in self.s.tvms.values()
            if t.rec.port_low
        }
        for index in range(cfg.capacity):
            if index not in used:
                tvm.rec.port_low, tvm.rec.port_high = allocate_tvm_range(cfg, index)
                return
        # No block left: the TVM still joins; its tasks see port range 0-0 and the reason on the TVM.
        tvm.rec.cert_errors = [
            *tvm.rec.cert_errors,
            f"no free port block: {cfg.capacity} blocks of {cfg.per_tvm} ports in use",
        ]

    def members_changed(self, pool_name: str) -> None:
        """Tell every TVM of a communicating pool who its members are now."""
        pool = self.s.pools.get(pool_name)
        if pool is None or not pool.spec.communication:
            return
        members = self.s.all_pool_tvms(pool_name)
        addresses = sorted({t.rec.ip for t in members if t.rec.ip})
        for t in members:
            self.out.send(t.rec.agent_id, pm.PoolMembers(addresses=addresses, pool=pool_name))

    def tvm_ready(self, tvm: Tvm, msg: pm.TvmReady) -> None:
        """Record what the agent reported when the TVM became ready (certificate install errors)."""
        errors = [e for e in tvm.rec.cert_errors if e.startswith("no free port block")] + list(
            msg.cert_errors
        )
        if errors != tvm.rec.cert_errors:
            tvm.rec.cert_errors = errors
            self.out.put("tvm", tvm.rec.name, tvm.rec)

    # ------------------------------------------------------------------ leaving

    def evict(self, tvm: Tvm, option: str, reason: str) -> None:
        """Kill what runs on the TVM: requeue it, or complete it with a failure (terminate)."""
        for key, task in tvm.running.items():
            self.out.send(
                tvm.rec.agent_id, pm.CancelTask(key=key, attempt=task.attempt, reason=reason)
            )
        if option == "requeue":
            self.runs.requeue_tvm_tasks(tvm)
            return
        now = self.s.clock()
        for key, task in list(tvm.running.items()):
            job = self.s.job_of(key)
            if job is None or task.state != RUNNING:
                continue
            task.exit_code = WALL_CLOCK_EXIT_CODE
            task.failure = ("ServerError", "TaskEnded", f"the task was terminated: {reason}")
            move_task(task, COMPLETED, job.tally)  # after its outcome: the tally reads it
            task.prev_state = RUNNING
            task.state_time = now
            task.end_time = now
            self.runs.put_task(job, task)
        tvm.running.clear()

    def begin_leave(self, tvm: Tvm, option: str, reason: str) -> None:
        if tvm.rec.pending_op in ("leave", "leaving"):
            return
        self.runs.set_tvm_state(tvm, "leavingpool")
        tvm.rec.pending_op = "leave"
        tvm.rec.pending_option = option
        self.out.put("tvm", tvm.rec.name, tvm.rec)
        if option != "taskcompletion":
            self.evict(tvm, option, reason)
        self.advance(tvm)

    def advance_all(self) -> None:
        if self.s.recovering_until is not None:
            return  # running tasks are not known until the agents report them: nothing has "ended" yet
        for tvm in list(self.s.tvms.values()):
            if tvm.rec.pending_op in ("leave", "reboot", "reimage", "offline"):
                self.advance(tvm)

    def advance(self, tvm: Tvm) -> None:
        """Carry out the TVM's pending operation once no task runs there."""
        op = tvm.rec.pending_op
        if not op or op == "leaving" or tvm.running:
            return
        rec = tvm.rec
        if op == "leave":
            rec.pending_op = "leaving"
            self.out.put("tvm", rec.name, rec)
            agent = self.s.agents.get(rec.agent_id)
            if agent is None or not agent.connected:
                self.forget_tvm(tvm)  # nobody to wipe it now; the agent is told when it comes back
                return
            self.out.send(
                rec.agent_id, pm.LeavePool(tvm_name=rec.name, reason="removed from the pool")
            )
        elif op in ("reboot", "reimage"):
            rec.pending_op = ""
            rec.pending_option = ""
            tvm.ready = False
            rec.start_task = None
            self.out.put("tvm", rec.name, rec)
            pool = self.s.pools.get(rec.pool)
            self.out.send(rec.agent_id, pm.RebootTvm(tvm_name=rec.name, reimage=op == "reimage"))
            if pool is not None:
                self.out.send(rec.agent_id, self.join_msg(pool, tvm))
        elif op == "offline":
            rec.pending_op = ""
            rec.pending_option = ""
            if rec.state in ("idle", "running"):
                self.runs.set_tvm_state(tvm, "offline")
            self.out.put("tvm", rec.name, rec)

    def tvm_left(self, agent_id: str, tvm_name: str) -> None:
        """The agent wiped the TVM: forget it, the agent is free again."""
        tvm = self.s.tvms.get(tvm_name)
        if tvm is not None and tvm.rec.agent_id == agent_id and tvm.rec.pending_op == "leaving":
            self.forget_tvm(tvm)

    def forget_tvm(self, tvm: Tvm) -> None:
        self.runs.requeue_tvm_tasks(tvm)
        pool = usage.tvm_left(self.s, tvm, self.s.clock())
        if pool is not None:
            self.out.put("pool", tvm.rec.pool, pool)
        name = tvm.rec.name
        self.s.tvms.pop(name, None)
        self.out.delete("tvm", name)
        self.members_changed(tvm.rec.pool)
        agent = self.s.agents.get(tvm.rec.agent_id)
        if agent is not None and agent.tvm == name:
            agent.tvm = None
        self.finish_pool_delete(tvm.rec.pool)
        self.allocate()

    def finish_pool_delete(self, name: str) -> None:
        """A deleting pool is dropped once its last TVM is gone."""
        pool = self.s.pools.get(name)
        if pool is None or pool.state != "deleting":
            return
        if any(t.rec.pool == name for t in self.s.tvms.values()):
            return
        del self.s.pools[name]
        self.out.delete("pool", name)
