"""Agents: registration, what they report, and losing them.

An agent is free (in the inventory) or backs one TVM. On hello it tells what it still runs and
what finished while it was away; the core reconciles that with its records. An agent silent for a
heartbeat timeout is closed; its TVM is lost (`unknown`, tasks requeued) if it does not come back.
"""

from __future__ import annotations

import math

import msgspec

from protocol import messages as pm

from .freeslots import queue_depth
from .healing import lost_reason
from .instructions import Outbox
from .jobprep import JobPrep
from .membership import Membership
from .records import ACTIVE, RUNNING, AgentInfo, Tvm
from .runs import Runs
from .states import TvmState, move_task
from .store import Store
from .tasks import Tasks

_READY_FROM = ("starting", "unknown", "creating", "waitingforstarttask", "rebooting", "reimaging")


class Agents:
    def __init__(
        self, store: Store, out: Outbox, runs: Runs, membership: Membership, tasks: Tasks
    ) -> None:
        self.s = store
        self.out = out
        self.runs = runs
        self.membership = membership
        self.tasks = tasks
        self.prep: JobPrep | None = None  # set by the facade (preparation and release runs)

    # ------------------------------------------------------------------ hello and goodbye

    def hello(self, hello: pm.Hello, in_flight: set[str] | frozenset[str] = frozenset()) -> None:
        """`in_flight`: keys of RunTasks still on their way to the agent (its session resumed)."""
        s = self.s
        now = s.clock()
        agent = s.agents.get(hello.agent_id)
        if agent is None:
            agent = s.agents[hello.agent_id] = AgentInfo(hello.agent_id)
            self.membership.agent_registered()
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
        agent.silent = False
        tvm = s.tvms.get(agent.tvm) if agent.tvm else None
        if tvm is None:
            agent.tvm = None
            for r in hello.running:  # tasks of a TVM we no longer know
                self.out.send(
                    agent.agent_id,
                    pm.CancelTask(key=r.key, attempt=r.attempt, reason="unknown TVM"),
                )
            if hello.tvm_name:  # removed while the agent was away: it wipes it before it is free
                self.out.send(
                    agent.agent_id,
                    pm.LeavePool(tvm_name=hello.tvm_name, reason="TVM no longer exists"),
                )
            self.membership.allocate()
            return
        tvm.queue = queue_depth(tvm.slots, agent.capabilities)  # what this agent process keeps
        moved = tvm.rec.ip != hello.ip_address
        tvm.rec.ip = hello.ip_address
        tvm.last_heartbeat = now
        if moved:  # the pool's fences must admit the new address (and drop the old one)
            self.membership.members_changed(tvm.rec.pool)
        if tvm.rec.pending_op == "leaving":  # the LeavePool may have been lost with the session
            self.out.send(
                agent.agent_id, pm.LeavePool(tvm_name=tvm.rec.name, reason="removed from the pool")
            )
            return
        if not (hello.session_id or hello.tvm_name or hello.running or hello.finished):
            # A fresh agent process (restart, reboot): what we placed on this TVM died with the old
            # process, which is why it reports nothing. Requeue that work and join the TVM again.
            self.runs.requeue_tvm_tasks(tvm)
            tvm.ready = False
            self.runs.set_tvm_state(tvm, "starting")
        if not tvm.ready:
            # Coordinator restarted (or the agent never confirmed): tell it again who it is.
            self.out.send(agent.agent_id, self.membership.join_msg(s.pools[tvm.rec.pool], tvm))
        for r in [*hello.running, *hello.finished]:
            self._reconcile_running(tvm, r)
        self._requeue_unreported(tvm, hello, in_flight)
        if self.prep is not None and self.s.job_preps:
            reported = {r.key for r in hello.running} | {r.key for r in hello.finished}
            self.prep.hello(tvm, reported, in_flight)
        if tvm.rec.state in ("unknown", "idle", "running"):
            # Also after a restore: the journal does not hold idle <-> running (Runs.set_tvm_state).
            self.runs.set_tvm_state(tvm, "running" if tvm.running else "idle")
        self._end_recovery_if_complete()

    def _reconcile_running(self, tvm: Tvm, r: pm.RunningTask) -> None:
        if self.prep is not None and self.prep.owns(r.key):
            self.prep.reconcile(tvm, r)
            return
        job, task = self.s.lookup(r.key)
        if "~" in r.key or (task is not None and task.multi is not None):
            # Multi-instance runs are adopted only by their live gang (multi.py), never alone.
            base = r.key.rpartition("~")[0] or r.key
            if not (
                self.runs.gangs.owns(r.key, r.attempt, tvm)
                or (base in self.runs.gangs.gangs and r.key == base)
            ):
                self.out.send(
                    tvm.rec.agent_id,
                    pm.CancelTask(key=r.key, attempt=r.attempt, reason="not assigned"),
                )
            return
        if (
            task is not None
            and task.state == RUNNING
            and task.attempt == r.attempt
            and task.tvm == tvm.rec.name
        ):
            tvm.running[r.key] = task
            return
        if (
            job is not None
            and task is not None
            and task.state == ACTIVE
            and (r.attempt >> 32) < self.s.epoch
        ):
            # Placed by an earlier coordinator run (placements are not journaled): adopt it.
            move_task(task, RUNNING, job.tally)
            task.attempt = r.attempt
            task.tvm = tvm.rec.name
            task.pool = tvm.rec.pool
            tvm.running[r.key] = task
            return
        self.out.send(
            tvm.rec.agent_id, pm.CancelTask(key=r.key, attempt=r.attempt, reason="not assigned")
        )

    def _requeue_unreported(
        self, tvm: Tvm, hello: pm.Hello, in_flight: set[str] | frozenset[str]
    ) -> None:
        """Tasks placed on this TVM that the agent neither runs nor finished, and whose RunTask is not
        still on its way, are lost (a restart, a session that could not resume, or a connection that
        was not the real agent's and never reported them): run them again (requeueCount+1, not a
        retry). Without this such a task stayed "running" for ever."""
        reported = {r.key for r in hello.running} | {r.key for r in hello.finished}
        for key, task in list(tvm.running.items()):
            if key in reported or key in in_flight:
                continue
            del tvm.running[key]
            job = self.s.job_of(key)
            if job is not None and task.state == RUNNING and task.multi is not None:
                self.runs.gangs.end(f"{job.key}/{task.name}", "an instance was lost")
                self.runs.requeue(job, task)
            elif job is not None and task.state == RUNNING and task.tvm == tvm.rec.name:
                self.runs.requeue(job, task)
        if not tvm.running and tvm.rec.state == "running":
            self.runs.set_tvm_state(tvm, "idle")

    def _end_recovery_if_complete(self) -> None:
        s = self.s
        if s.recovering_until is None:
            return
        if all(
            s.agents.get(t.rec.agent_id) and s.agents[t.rec.agent_id].connected
            for t in s.tvms.values()
        ):
            s.recovering_until = None

    def disconnected(self, agent_id: str) -> None:
        agent = self.s.agents.get(agent_id)
        if agent is None:
            return
        agent.connected = False
        agent.disconnected_at = self.s.clock()

    def forget(self, agent_id: str) -> None:
        """A revoked agent: its TVM leaves the pool at once (running tasks requeued, the pool can
        allocate a replacement) and the agent is no longer in the inventory."""
        agent = self.s.agents.pop(agent_id, None)
        if agent is None:
            return
        tvm = self.s.tvms.get(agent.tvm) if agent.tvm else None
        if tvm is not None:
            self.membership.forget_tvm(tvm)

    # ------------------------------------------------------------------ messages

    def message(self, agent_id: str, msg: pm.Msg) -> None:
        s = self.s
        agent = s.agents.get(agent_id)
        if agent is None:
            return
        now = s.clock()
        agent.last_seen = now
        tvm = s.tvms.get(agent.tvm) if agent.tvm else None
        if isinstance(msg, _TIMED):
            msg = _finite_times(msg, now)
        if isinstance(msg, pm.TaskCompleted):
            if self.prep is not None and self.s.job_preps and self.prep.owns(msg.key):
                self.prep.completed(tvm, msg)
            else:
                gangs = self.runs.gangs
                if "~" in msg.key:  # an instance of a multi-instance task (multi.py)
                    done = gangs.sub_completed(msg)
                    if done is None:
                        return
                    msg = done
                if gangs.gangs:
                    gangs.app_completed(msg)
                self.tasks.task_completed(msg, now)
        elif isinstance(msg, pm.TaskStarted):
            if "~" in msg.key:
                self.runs.gangs.sub_started(msg)
            else:
                self.tasks.task_started(msg)
        elif isinstance(msg, pm.Heartbeat):
            if tvm is not None:
                tvm.last_heartbeat = now  # what it reports: healing.Healing.heartbeat
        elif isinstance(msg, pm.TvmReady):
            if (
                tvm is not None
                and tvm.rec.name == msg.tvm_name
                and not tvm.rec.pending_op.startswith("leav")
            ):
                tvm.ready = True
                self.membership.tvm_ready(tvm, msg)
                if tvm.rec.state in _READY_FROM:
                    ready_state: TvmState = "running" if tvm.running else "idle"
                    self.runs.set_tvm_state(
                        tvm, "offline" if tvm.rec.scheduling == "disabled" else ready_state
                    )
        elif isinstance(msg, pm.StartTaskCompleted):
            if tvm is not None:
                self._start_task_completed(tvm, msg)
        elif isinstance(msg, pm.StartTaskStarted):
            if tvm is not None and tvm.rec.name == msg.tvm_name:
                self._start_task_started(tvm, msg)
        elif isinstance(msg, pm.TvmLeft):
            self.membership.tvm_left(agent_id, msg.tvm_name)
        elif isinstance(msg, pm.Draining):
            if tvm is not None:
                self.runs.set_tvm_state(tvm, "offline")
        if tvm is not None and tvm.rec.pending_op and not tvm.running:
            self.membership.advance(tvm)  # taskcompletion reached

    def _start_task_started(self, tvm: Tvm, msg: pm.StartTaskStarted) -> None:
        tvm.rec.start_task = {
            "state": "running",
            "start_time": msg.start_time,
            "retry_count": msg.retry_count,
        }
        pool = self.s.pools.get(tvm.rec.pool)
        waits = bool(pool and pool.spec.start_task and pool.spec.start_task.wait_for_success)
        if waits and tvm.rec.state in ("starting", "creating", "rebooting", "reimaging", "unknown"):
            self.runs.set_tvm_state(tvm, "waitingforstarttask")
        self.out.put("tvm", tvm.rec.name, tvm.rec)

    def _start_task_completed(self, tvm: Tvm, msg: pm.StartTaskCompleted) -> None:
        tvm.rec.start_task = {
            "state": "completed",
            "start_time": msg.start_time,
            "end_time": msg.end_time,
            "exit_code": msg.exit_code,
            "retry_count": msg.retry_count,
            "failure": [msg.failure.category, msg.failure.code, msg.failure.message]
            if msg.failure
            else None,
        }
        pool = self.s.pools.get(tvm.rec.pool)
        waits = bool(pool and pool.spec.start_task and pool.spec.start_task.wait_for_success)
        if waits and (msg.exit_code != 0 or msg.failure) and not tvm.rec.pending_op:
            self.runs.set_tvm_state(tvm, "starttaskfailed")
        self.out.put("tvm", tvm.rec.name, tvm.rec)

    # ------------------------------------------------------------------ clock

    def end_recovery_if_due(self, now: float) -> None:
        if self.s.recovering_until is not None and now >= self.s.recovering_until:
            self.s.recovering_until = None

    def check_lost(self, now: float) -> None:
        """Close agents silent for a heartbeat timeout; a TVM whose agent stayed away that long is
        lost (`unknown`, its tasks requeued), or forgotten if it was leaving anyway."""
        s = self.s
        # A closed link gets a short grace to come back (healing.py); right after a coordinator
        # restart every agent is "away" and gets the whole heartbeat timeout to reconnect.
        grace = (
            s.heartbeat_timeout
            if s.recovering_until is not None
            else min(s.link_grace, s.heartbeat_timeout)
        )
        for tvm in list(s.tvms.values()):
            agent = s.agents.get(tvm.rec.agent_id)
            lost = agent is None or (
                not agent.connected
                and agent.disconnected_at is not None
                and now - agent.disconnected_at >= grace
            )
            if (
                agent is not None
                and agent.connected
                and now - agent.last_seen >= s.heartbeat_timeout
            ):
                self.out.close(agent.agent_id, 4008, "heartbeat timeout")
                agent.connected = False
                agent.silent = True
                # The silence already lasted a heartbeat timeout: the TVM is lost at the next tick
                # unless the agent reconnects first, not after a second full timeout.
                agent.disconnected_at = agent.last_seen
            if lost and tvm.rec.pending_op in ("leave", "leaving"):
                self.membership.forget_tvm(tvm)  # it was leaving anyway
                continue
            if lost and tvm.rec.state != "unknown":
                self.runs.requeue_tvm_tasks(tvm)
                tvm.rec.state_reason = lost_reason(agent, now, grace)
                self.runs.set_tvm_state(tvm, "unknown")


_TIMED = (pm.TaskStarted, pm.TaskCompleted, pm.StartTaskCompleted)


def _finite_times(msg: pm.Msg, now: float) -> pm.Msg:
    """An agent's times as the core keeps them: one that is not a finite number (a broken agent)
    is taken as the moment the message arrived, so no view or duration computed from it fails."""
    if math.isfinite(getattr(msg, "start_time", 0.0)) and math.isfinite(
        getattr(msg, "end_time", 0.0)
    ):
        return msg
    fixed = {
        k: now
        for k in ("start_time", "end_time")
        if hasattr(msg, k) and not math.isfinite(getattr(msg, k))
    }
    return msgspec.structs.replace(msg, **fixed)
