"""TVM healing: TVMs whose agent is gone leave their pool, TVMs that fail tasks are set aside.

* A TVM whose agent is gone is `unknown` and its running tasks are requeued: when the shell saw the
  agent's process exit (`agent_exited`, from the local provisioner), when its link closed and did
  not come back within `link_grace` seconds, or when it was silent for the heartbeat timeout
  (`agents.Agents.check_lost`).
* An `unknown` TVM that stays so for its pool's `unknownTvmTimeout` (the coordinator's default
  otherwise) leaves the pool; the pool then gets another agent, from the provisioner if none is
  free (`membership.Membership.allocate`). If a provisioner started that TVM's agent, the agent is
  retired: the shell has its provisioner stop it (`Retire`), and should it come back meanwhile
  (a stopped process continued, a host back from a partition) its hello is refused with
  `AgentRetired`, so no process nobody asked for stays on as a free agent. A hand-started agent
  has no provisioner to stop it: it stays, and is free again when it comes back.
* A TVM on which `unusable_after_failures` tasks in a row failed, each of which then succeeded on
  another TVM, is `unusable` with a reason (the seed's bad-VM handling). A task that fails
  everywhere says nothing about the TVM, hence "succeeded elsewhere". The TVM keeps its tasks; an
  operator reboots, reimages or removes it.
* What the agent reports in its heartbeats: disk space (below `unusable_free_disk_bytes` free the
  TVM is `unusable` until space comes back), host state it could not repair (`unusable` with the
  agent's reason until it reports none) and degraded modes found while running (ports unfenced
  after a failed nftables setup, ...). `degraded_modes` is what the TVM's record and `tvm status`
  show: the agent's start-up findings, its latest ones, and a nearly full disk.

Reasons are "<Code>: <why>"; `TvmRec.state_reason` carries the current one.
"""

from __future__ import annotations

from protocol import messages as pm

from .instructions import Outbox
from .membership import Membership
from .records import AgentInfo, Tvm
from .runs import Runs
from .states import TvmState
from .store import Store

# Below this much free space on the TVM root a TVM is `unusable` (reference §4.2: disk full): it
# keeps what runs but gets no new tasks until space comes back. Below twice that it is reported
# as a degraded mode first.
UNUSABLE_FREE_DISK_BYTES = 256 * 1024 * 1024
DISK_NEARLY_FULL = "disk-nearly-full"
MAX_STREAK = 1000

# Reason codes. The ones the heartbeat sets are also the ones it clears.
AGENT_EXITED = "AgentExited"
LINK_LOST = "AgentLinkLost"
HEARTBEAT_TIMEOUT = "HeartbeatTimeout"
DISK_FULL = "DiskFull"
HOST_STATE = "HostStateBroken"
TASK_FAILURES = "TaskFailures"
AGENT_RETIRED = "AgentRetired"
_FROM_HEARTBEAT = (DISK_FULL, HOST_STATE)
_SERVING = ("idle", "running", "offline")
_NOT_READY = ("starting", "creating", "waitingforstarttask", "rebooting", "reimaging")


def lost_reason(agent: AgentInfo | None, now: float, grace: float) -> str:
    if agent is None:
        return f"{AGENT_EXITED}: the TVM's agent is gone"
    if agent.silent:
        return f"{HEARTBEAT_TIMEOUT}: the agent was silent for the heartbeat timeout"
    # The time it was really away: after a restart an agent gets the whole recovery window, not
    # the grace, and the reason should not claim the shorter wait.
    away = grace if agent.disconnected_at is None else max(grace, now - agent.disconnected_at)
    return f"{LINK_LOST}: the agent's link closed and was not back within {away:.3g} s"


def _code(reason: str) -> str:
    return reason.partition(":")[0]


class Healing:
    def __init__(self, store: Store, out: Outbox, runs: Runs, membership: Membership) -> None:
        self.s = store
        self.out = out
        self.runs = runs
        self.membership = membership
        self.unusable_free_disk_bytes = UNUSABLE_FREE_DISK_BYTES
        # Memory only (a coordinator restart forgets them; the agents report again).
        self.reported: dict[str, list[str]] = {}  # agent id -> degraded modes of its last heartbeat
        self.disk: dict[str, tuple[int, int]] = {}  # TVM name -> (free, total) bytes
        self.streaks: dict[str, list[str]] = {}  # TVM name -> keys of tasks failed in a row there
        self.failed_on: dict[str, str] = {}  # task key -> TVM its last attempt failed on
        self.confirmed: dict[str, set[str]] = {}  # TVM name -> streak keys that succeeded elsewhere

    # ------------------------------------------------------------------ agents gone

    def agent_exited(self, agent_id: str, why: str) -> None:
        """The shell saw the agent's process end: its TVM is lost now, not after a timeout, and the
        agent leaves the inventory (a new process enrols as a new agent)."""
        s = self.s
        agent = s.agents.pop(agent_id, None)
        if agent is None:
            return
        self.reported.pop(agent_id, None)
        if agent.connected:
            self.out.close(agent_id, 4009, "agent process exited")
        tvm = s.tvms.get(agent.tvm) if agent.tvm else None
        if tvm is None or tvm.rec.agent_id != agent_id:
            return
        if tvm.rec.pending_op in ("leave", "leaving"):
            self.membership.forget_tvm(tvm)  # it was leaving anyway
            return
        self.runs.requeue_tvm_tasks(tvm)
        self.set_state(tvm, "unknown", f"{AGENT_EXITED}: {why}")

    def unknown_timeout(self, pool_name: str) -> float:
        pool = self.s.pools.get(pool_name)
        if pool is not None and pool.spec.unknown_tvm_timeout:
            from coordinator.common.timeutil import parse_duration

            return parse_duration(pool.spec.unknown_tvm_timeout, "unknownTvmTimeout")
        return self.s.unknown_tvm_timeout

    def expire_unknown(self, now: float) -> None:
        """(tick) `unknown` TVMs past their pool's timeout leave the pool; allocation replaces them."""
        if self.s.recovering_until is not None:
            return  # their agents are still reconnecting after a restart
        for tvm in list(self.s.tvms.values()):
            rec = tvm.rec
            if rec.state == "unknown" and now - rec.state_time >= self.unknown_timeout(rec.pool):
                self.forget(rec.name)
                self._retire(tvm)
                self.membership.forget_tvm(tvm)

    def _retire(self, tvm: Tvm) -> None:
        """The TVM leaves its pool for good: a provisioned agent that is still away goes too (the
        pool's replacement comes from the provisioner)."""
        s = self.s
        agent = s.agents.get(tvm.rec.agent_id)
        if agent is None or agent.connected or not s.is_provisioned(agent.agent_id):
            return
        why = (
            f"{AGENT_RETIRED}: its TVM {tvm.rec.name} was lost ({_code(tvm.rec.state_reason)})"
            f" and left pool {tvm.rec.pool}; a new agent takes its place"
        )
        del s.agents[agent.agent_id]
        self.reported.pop(agent.agent_id, None)
        s.retired[agent.agent_id] = why
        self.out.retire(agent.agent_id, why)

    def agents_started(self, names: list[str]) -> None:
        """A provisioner started these agents (the shell tells): they may be retired."""
        self.s.provisioned.update(names)
        for name in names:
            self.s.retired.pop(name, None)  # a name given again is a new agent

    def retired_reason(self, agent_id: str) -> str:
        """Why this agent was retired ("" if it was not): its hello is refused with it."""
        return self.s.retired.get(agent_id, "")

    def forget(self, tvm_name: str) -> None:
        self.disk.pop(tvm_name, None)
        self.confirmed.pop(tvm_name, None)
        for key in self.streaks.pop(tvm_name, []):
            if self.failed_on.get(key) == tvm_name:
                del self.failed_on[key]

    # ------------------------------------------------------------------ tasks that fail on one TVM

    def task_result(self, key: str, tvm_name: str, ok: bool) -> None:
        """A run of task `key` on `tvm_name` ended; `ok`: exit code 0 and no failure."""
        if not ok:
            streak = self.streaks.setdefault(tvm_name, [])
            if key not in streak:
                streak.append(key)
                if len(streak) > MAX_STREAK:  # memory stays bounded on a TVM that fails everything
                    old = streak.pop(0)
                    if self.failed_on.get(old) == tvm_name:
                        del self.failed_on[old]
            self.failed_on[key] = tvm_name
            return
        self.forget(tvm_name)  # a success here ends this TVM's streak
        bad = self.failed_on.pop(key, None)
        if bad is None or bad == tvm_name or key not in self.streaks.get(bad, ()):
            return
        confirmed = self.confirmed.setdefault(bad, set())
        confirmed.add(key)
        tvm = self.s.tvms.get(bad)
        n = self.s.unusable_after_failures
        if tvm is None or len(confirmed) < n or tvm.rec.state not in _SERVING:
            return
        self.set_state(
            tvm,
            "unusable",
            f"{TASK_FAILURES}: {len(self.streaks[bad])} tasks in a row failed on this TVM and "
            f"{len(confirmed)} of them then succeeded on another",
        )
        self.forget(bad)  # after the operator's reboot or reimage it starts from a clean slate

    # ------------------------------------------------------------------ what the agent reports

    def heartbeat(self, agent_id: str, msg: pm.Heartbeat) -> None:
        s = self.s
        agent = s.agents.get(agent_id)
        if agent is None:
            return
        if msg.degraded is not None:
            self.reported[agent_id] = list(msg.degraded)
        tvm = s.tvms.get(agent.tvm) if agent.tvm else None
        if tvm is None:
            return
        why = ""
        if agent.disk_bytes > 0 and msg.disk_used_bytes > 0:
            free = max(0, agent.disk_bytes - msg.disk_used_bytes)
            self.disk[tvm.rec.name] = (free, agent.disk_bytes)
            if free < self.unusable_free_disk_bytes:
                why = f"{DISK_FULL}: {_mib(free)} free of {_mib(agent.disk_bytes)} on the TVM root"
        if msg.unusable:
            why = f"{HOST_STATE}: {msg.unusable}"
        self._apply(tvm, why)

    def _apply(self, tvm: Tvm, why: str) -> None:
        rec = tvm.rec
        if why and (rec.state in _SERVING or rec.state in _NOT_READY):
            self.set_state(tvm, "unusable", why)
        elif why and rec.state == "unusable" and _code(rec.state_reason) in _FROM_HEARTBEAT:
            self.set_state(tvm, "unusable", why)  # the reason changed
        elif not why and rec.state == "unusable" and _code(rec.state_reason) in _FROM_HEARTBEAT:
            back: TvmState = "running" if tvm.running else "idle"
            if not tvm.ready:
                back = "starting"
            elif rec.scheduling == "disabled":
                back = "offline"
            self.set_state(tvm, back)

    def set_state(self, tvm: Tvm, state: TvmState, reason: str = "") -> None:
        """A state change with its reason (the record is journaled with both)."""
        rec = tvm.rec
        if rec.state == state and rec.state_reason == reason:
            return
        rec.state_reason = reason
        if rec.state == state:
            self.out.put("tvm", rec.name, rec)
        else:
            self.runs.set_tvm_state(tvm, state)

    def degraded_modes(self, tvm: Tvm) -> list[str]:
        """Everything this TVM cannot enforce or is short of, "<code>: <why>", for its record."""
        agent = self.s.agents.get(tvm.rec.agent_id)
        modes = list(agent.degraded) if agent is not None else []
        for mode in self.reported.get(tvm.rec.agent_id, ()):
            if mode not in modes:
                modes.append(mode)
        free, total = self.disk.get(tvm.rec.name, (-1, 0))
        if 0 <= free < 2 * self.unusable_free_disk_bytes:
            modes.append(
                f"{DISK_NEARLY_FULL}: {_mib(free)} free of {_mib(total)} on the TVM root "
                f"(unusable below {_mib(self.unusable_free_disk_bytes)})"
            )
        return modes


def _mib(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB"
