"""Agent registration, agent events and the clock tick (part of the pure core)."""

from __future__ import annotations

from protocol import messages as pm

from ._core_base import CoreBase
from .records import (
    ACTIVE,
    COMPLETED,
    RUNNING,
    AgentInfo,
    Tvm,
)


class AgentsMixin(CoreBase):
    # ------------------------------------------------------------------ agents

    def agent_hello(self, hello: pm.Hello, in_flight: set[str] | frozenset[str] = frozenset()) -> None:
        """`in_flight`: keys of RunTasks still on their way to the agent (its session resumed)."""
        now = self.clock()
        agent = self.agents.get(hello.agent_id)
        if agent is None:
            agent = self.agents[hello.agent_id] = AgentInfo(hello.agent_id)
            self._agent_registered()  # type: ignore[attr-defined]
        agent.connected = True
        agent.hostname = hello.hostname
        agent.ip = hello.ip_address
        agent.cores = hello.cores
        agent.memory_bytes = hello.memory_bytes
        agent.disk_bytes = hello.disk_bytes
        agent.capabilities = list(hello.capabilities)
        agent.degraded = list(hello.degraded)
        agent.last_seen = now
        agent.disconnected_at = None
        tvm = self.tvms.get(agent.tvm) if agent.tvm else None
        if tvm is None:
            agent.tvm = None
            for r in hello.running:  # tasks of a TVM we no longer know
                self._send(agent.agent_id, pm.CancelTask(key=r.key, attempt=r.attempt, reason="unknown TVM"))
            if hello.tvm_name:  # removed while the agent was away: it wipes it before it is free
                self._send(agent.agent_id, pm.LeavePool(tvm_name=hello.tvm_name, reason="TVM no longer exists"))
            self._allocate()
            return
        moved = tvm.rec.ip != hello.ip_address
        tvm.rec.ip = hello.ip_address
        tvm.last_heartbeat = now
        if moved:  # issue 8: the pool's fences must admit the new address (and drop the old one)
            self._members_changed(tvm.rec.pool)  # type: ignore[attr-defined]
        if tvm.rec.pending_op == "leaving":  # issue 5: the LeavePool may have been lost with the session
            self._send(agent.agent_id, pm.LeavePool(tvm_name=tvm.rec.name, reason="removed from the pool"))
            return
        if not (hello.session_id or hello.tvm_name or hello.running or hello.finished):
            # A fresh agent process (restart, reboot): what we placed on this TVM died with the old
            # process, which is why it reports nothing. Requeue that work and join the TVM again.
            self._requeue_tvm_tasks(tvm)
            tvm.ready = False
            self._set_tvm_state(tvm, "starting")
        if not tvm.ready:
            # Coordinator restarted (or the agent never confirmed): tell it again who it is.
            self._send(agent.agent_id, self._join_msg(self.pools[tvm.rec.pool], tvm))
        for r in [*hello.running, *hello.finished]:
            self._reconcile_running(tvm, r)
        self._requeue_unreported(tvm, hello, in_flight)
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

    def _requeue_unreported(self, tvm: Tvm, hello: pm.Hello, in_flight: set[str] | frozenset[str]) -> None:
        """Tasks placed on this TVM that the agent neither runs nor finished, and whose RunTask is not
        still on its way, are lost (a restart, a session that could not resume, or a connection that
        was not the real agent's and never reported them): run them again (requeueCount+1, not a
        retry). Without this such a task stayed "running" for ever."""
        reported = {r.key for r in hello.running} | {r.key for r in hello.finished}
        for key, task in list(tvm.running.items()):
            if key in reported or key in in_flight:
                continue
            del tvm.running[key]
            job = self.jobs.get(key.rpartition("/")[0])
            if job is not None and task.state == RUNNING and task.tvm == tvm.rec.name:
                self._requeue(job, task)
        if not tvm.running and tvm.rec.state == "running":
            self._set_tvm_state(tvm, "idle")

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
                self._check_disk(agent, tvm, msg)
        elif isinstance(msg, pm.TvmReady):
            if tvm is not None and tvm.rec.name == msg.tvm_name and not tvm.rec.pending_op.startswith("leav"):
                tvm.ready = True
                self._tvm_ready(tvm, msg)  # type: ignore[attr-defined]
                if tvm.rec.state in ("starting", "unknown", "creating", "waitingforstarttask", "rebooting",
                                     "reimaging"):
                    ready_state = "running" if tvm.running else "idle"
                    self._set_tvm_state(tvm, "offline" if tvm.rec.scheduling == "disabled" else ready_state)
        elif isinstance(msg, pm.StartTaskCompleted):
            if tvm is not None:
                self._start_task_completed(tvm, msg)
        elif isinstance(msg, pm.StartTaskStarted):
            if tvm is not None and tvm.rec.name == msg.tvm_name:
                self._start_task_started(tvm, msg)
        elif isinstance(msg, pm.TvmLeft):
            self.tvm_left(agent_id, msg.tvm_name)  # type: ignore[attr-defined]
        elif isinstance(msg, pm.Draining):
            if tvm is not None:
                self._set_tvm_state(tvm, "offline")
        if tvm is not None and tvm.rec.pending_op and not tvm.running:
            self._advance_tvm(tvm)  # type: ignore[attr-defined]  # issue 5: taskcompletion reached

    # Below this much free space on the TVM root a TVM is `unusable` (reference §4.2: disk full):
    # it keeps what runs but gets no new tasks until space comes back.
    unusable_free_disk_bytes: int = 256 * 1024 * 1024

    def _check_disk(self, agent: AgentInfo, tvm: Tvm, msg: pm.Heartbeat) -> None:
        if agent.disk_bytes <= 0 or msg.disk_used_bytes <= 0:
            return
        full = agent.disk_bytes - msg.disk_used_bytes < self.unusable_free_disk_bytes
        if full and tvm.rec.state in ("idle", "running", "offline"):
            self._set_tvm_state(tvm, "unusable")
        elif not full and tvm.rec.state == "unusable":
            back = "running" if tvm.running else "idle"
            self._set_tvm_state(tvm, "offline" if tvm.rec.scheduling == "disabled" else back)

    def _start_task_started(self, tvm: Tvm, msg: pm.StartTaskStarted) -> None:
        tvm.rec.start_task = {"state": "running", "start_time": msg.start_time, "retry_count": msg.retry_count}
        pool = self.pools.get(tvm.rec.pool)
        waits = bool(pool and pool.spec.start_task and pool.spec.start_task.wait_for_success)
        if waits and tvm.rec.state in ("starting", "creating", "rebooting", "reimaging", "unknown"):
            self._set_tvm_state(tvm, "waitingforstarttask")
        self._put("tvm", tvm.rec.name, tvm.rec)

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
        if waits and (msg.exit_code != 0 or msg.failure) and not tvm.rec.pending_op:
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
        if msg.failure is not None and msg.failure.code == pm.AGENT_STOPPING:
            # The agent gave this attempt up while shutting down: not the task's fault, run it again.
            if task.state == RUNNING:
                holder = self.tvms.get(task.tvm or "")
                if holder is not None:
                    holder.running.pop(msg.key, None)
                    if not holder.running and holder.rec.state == "running":
                        self._set_tvm_state(holder, "idle")
                now = self.clock()
                task.state, task.prev_state, task.state_time = ACTIVE, RUNNING, now
                task.requeue_count += 1
                task.last_requeue = now
                task.tvm = None
                job.queue.appendleft(task)
                self._put_task(job, task)
            return
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
        if task.state == COMPLETED:
            self._job_task_done(job, task)  # issue 6: job manager done / all tasks complete

    # ------------------------------------------------------------------ clock

    def tick(self) -> None:
        """Periodic: lost TVMs, recovery end, resize timeouts."""
        now = self.clock()
        if self.recovering_until is not None and now >= self.recovering_until:
            self.recovering_until = None
        self._expire_users()  # type: ignore[attr-defined]
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
                # The silence already lasted a heartbeat timeout: the TVM is lost at the next tick
                # unless the agent reconnects first (issue 4), not after a second full timeout.
                agent.disconnected_at = agent.last_seen
            if lost and tvm.rec.pending_op in ("leave", "leaving"):
                self._forget_tvm(tvm)  # type: ignore[attr-defined]  # it was leaving anyway
                continue
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
        # Issue 5: taskcompletion waits that ended, auto pools of finished jobs, provisioner retries.
        self._advance_tvm_ops()  # type: ignore[attr-defined]
        self._release_auto_pools()  # type: ignore[attr-defined]
        self._allocate()  # type: ignore[attr-defined]
        self.check_jobs()  # issue 6: schedules, job wall clocks, terminating/disabling ends
