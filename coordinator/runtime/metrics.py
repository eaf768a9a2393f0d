"""Coordinator metrics: link latency, placement rate, cluster summary and Prometheus text.

`GET /metrics` is exempt from SharedKey: Prometheus and similar scrapers cannot sign requests. To
keep that safe it exposes aggregates only — counts by state, rates, latency distributions — and no
resource names (pools, TVMs, agents, jobs): nothing a user submitted leaks through it. The
per-TVM view with names (agent health, heartbeat ages) is `GET /ops/status`, which needs the key.

Link latency: every `PING_INTERVAL` the coordinator sends each connected agent a (sequenced) `Ping`.
The agent acknowledges every frame as soon as it has read it, so the time until the cumulative ack
covers the Ping's sequence number is one round trip through both event loops — what a RunTask or a
completion actually experiences. An older agent that does not know `Ping` answers `Unsupported`, and
its ack still measures the round trip.

The bookkeeping classes are pure (callers pass `now`); only `monitor_links` touches Trio.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from protocol import messages as pm

if TYPE_CHECKING:
    from coordinator.core import CoordinatorState


PING_INTERVAL = 5.0
RATE_WINDOW = 60.0
# Round-trip buckets (seconds): loopback is ~100 µs, a WAN link tens of ms, a wedged agent seconds.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# States shown even at zero, so dashboards do not lose series.
TVM_STATES = (
    "creating",
    "starting",
    "waitingforstarttask",
    "idle",
    "running",
    "offline",
    "rebooting",
    "reimaging",
    "leavingpool",
    "unknown",
    "starttaskfailed",
)
TASK_STATES = ("active", "running", "completed")


# --------------------------------------------------------------------------- pure bookkeeping


@dataclass
class LinkLatency:
    """Outstanding pings per agent and the round-trip times measured from their acks."""

    buckets: tuple[float, ...] = RTT_BUCKETS
    last_rtt: dict[str, float] = field(default_factory=dict)
    # agent -> (session id, seq, sent at); a ping sent on an earlier session is never acked
    _pending: dict[str, tuple[str, int, float]] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), +Inf last
    total: float = 0.0
    observations: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def pending(self, agent_id: str) -> bool:
        return agent_id in self._pending

    def sent(self, agent_id: str, session: str, seq: int, now: float) -> None:
        self._pending[agent_id] = (session, seq, now)

    def acked(self, agent_id: str, session: str, peer_acked: int, now: float) -> float | None:
        """The peer acknowledged everything up to `peer_acked`; returns the RTT if a ping completed."""
        p = self._pending.get(agent_id)
        if p is None:
            return None
        if p[0] != session:
            del self._pending[agent_id]  # the link restarted its session: that ping is gone
            return None
        if peer_acked < p[1]:
            return None
        del self._pending[agent_id]
        rtt = max(0.0, now - p[2])
        self.last_rtt[agent_id] = rtt
        self.counts[bisect.bisect_left(self.buckets, rtt)] += 1
        self.total += rtt
        self.observations += 1
        return rtt

    def forget(self, agent_id: str) -> None:
        """The link went away: its outstanding ping will never be acked on this session."""
        self._pending.pop(agent_id, None)
        self.last_rtt.pop(agent_id, None)


@dataclass
class RateWindow:
    """Events per second over the last `window` seconds, from samples of a monotonic counter."""

    window: float = RATE_WINDOW
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def sample(self, now: float, total: int) -> None:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


# --------------------------------------------------------------------------- cluster summary


class TaskTotals(msgspec.Struct, rename="camel"):
    active: int = 0
    running: int = 0
    completed: int = 0
    succeeded: int = 0
    failed: int = 0
    queue_depth: int = 0  # active tasks of active jobs: what placement would take next


class PoolSummary(msgspec.Struct, rename="camel"):
    name: str
    state: str
    allocation_state: str
    target: int
    current: int
    tvms: dict[str, int]


class TvmHealth(msgspec.Struct, rename="camel"):
    pool: str
    name: str
    state: str
    agent_id: str
    agent_connected: bool
    running_tasks: int
    # Seconds since the agent's last heartbeat (or any message) on this coordinator run; None: not seen.
    last_heartbeat_age_seconds: float | None
    link_rtt_seconds: float | None
    degraded_modes: list[str] = []  # what the agent's host cannot enforce (tvmagent/degraded.py)
    state_reason: str = ""  # why it is `unknown` or `unusable`


class ClusterStatus(msgspec.Struct, rename="camel"):
    account: str
    recovering: bool
    agents_connected: int
    agents_free: int
    tasks: TaskTotals
    placements_total: int
    placements_per_second: float
    pools: list[PoolSummary]
    tvms: list[TvmHealth]


def task_totals(core: CoordinatorState) -> TaskTotals:
    """One pass over every task (the only O(tasks) part of a scrape), counted by the core."""
    t = TaskTotals()
    for job in core.jobs.values():
        c = core.task_counts(job)
        t.active += c.active
        t.running += c.running
        t.completed += c.completed
        t.succeeded += c.succeeded
        t.failed += c.failed
        if job.rec.state == "active":
            t.queue_depth += c.active
    return t


def _last_heard(core: CoordinatorState, tvm: Any) -> float | None:
    """When the TVM's agent last showed life: its last heartbeat, or any message after it."""
    agent = core.agents.get(tvm.rec.agent_id)
    seen = max(tvm.last_heartbeat or 0.0, agent.last_seen if agent is not None else 0.0)
    return seen or None


def cluster_status(
    core: CoordinatorState, latency: LinkLatency, rate: RateWindow, now: float
) -> ClusterStatus:
    by_pool: dict[str, dict[str, int]] = {name: {} for name in core.pools}
    tvms: list[TvmHealth] = []
    for tvm in sorted(core.tvms.values(), key=lambda t: (t.rec.pool, t.rec.name)):
        states = by_pool.setdefault(tvm.rec.pool, {})
        states[tvm.rec.state] = states.get(tvm.rec.state, 0) + 1
        agent = core.agents.get(tvm.rec.agent_id)
        tvms.append(
            TvmHealth(
                pool=tvm.rec.pool,
                name=tvm.rec.name,
                state=tvm.rec.state,
                agent_id=tvm.rec.agent_id,
                agent_connected=bool(agent and agent.connected),
                running_tasks=len(tvm.running),
                last_heartbeat_age_seconds=None
                if (heard := _last_heard(core, tvm)) is None
                else round(max(0.0, now - heard), 3),
                link_rtt_seconds=latency.last_rtt.get(tvm.rec.agent_id),
                degraded_modes=core.tvm_degraded(tvm),
                state_reason=tvm.rec.state_reason
                if tvm.rec.state in ("unknown", "unusable")
                else "",
            )
        )
    pools = [
        PoolSummary(
            name=name,
            state=p.state,
            allocation_state=p.alloc_state,
            target=p.target,
            current=sum(by_pool.get(name, {}).values()),
            tvms=by_pool.get(name, {}),
        )
        for name, p in sorted(core.pools.items())
    ]
    return ClusterStatus(
        account=core.account,
        recovering=core.recovering_until is not None,
        agents_connected=sum(1 for a in core.agents.values() if a.connected),
        agents_free=sum(1 for a in core.agents.values() if a.connected and a.tvm is None),
        tasks=task_totals(core),
        placements_total=core.placements,
        placements_per_second=round(rate.rate(), 3),
        pools=pools,
        tvms=tvms,
    )


# --------------------------------------------------------------------------- Prometheus text


def _fmt(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return (
        repr(float(value))
        if isinstance(value, float) and not value.is_integer()
        else str(int(value))
    )


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self,
        name: str,
        kind: str,
        help_: str,
        samples: Iterable[tuple[dict[str, str], float]],
        suffix_samples: Iterable[tuple[str, dict[str, str], float]] = (),
    ) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_fmt(value)}")
        for suffix, labels, value in suffix_samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_fmt(value)}")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), "")}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


def render_prometheus(
    core: CoordinatorState,
    latency: LinkLatency,
    rate: RateWindow,
    now: float,
    *,
    http_requests: int = 0,
    started_at: float = 0.0,
    agent_link_events: dict[str, int] | None = None,
    agent_frames: tuple[int, int] = (0, 0),
    journal_commits: tuple[int, int] = (0, 0),
) -> str:
    """Prometheus text exposition format 0.0.4 (aggregates only; see the module docstring)."""
    tt = task_totals(core)
    out = _Text()
    out.metric(
        "tvm_tasks",
        "gauge",
        "Tasks by state.",
        [({"state": s}, getattr(tt, s)) for s in TASK_STATES],
    )
    out.metric(
        "tvm_tasks_completed",
        "gauge",
        "Completed tasks by result.",
        [({"result": "succeeded"}, tt.succeeded), ({"result": "failed"}, tt.failed)],
    )
    out.metric(
        "tvm_queue_depth",
        "gauge",
        "Active tasks of active jobs waiting for a TVM slot.",
        [({}, tt.queue_depth)],
    )
    out.metric(
        "tvm_placements_total",
        "counter",
        "Tasks placed on TVMs since the coordinator started.",
        [({}, core.placements)],
    )
    out.metric(
        "tvm_placements_per_second",
        "gauge",
        f"Placements per second over the last {RATE_WINDOW:.0f} s.",
        [({}, round(rate.rate(), 3))],
    )
    tvm_states = dict.fromkeys(TVM_STATES, 0)
    heartbeat_ages: list[float] = []
    for tvm in core.tvms.values():
        tvm_states[tvm.rec.state] = tvm_states.get(tvm.rec.state, 0) + 1
        agent = core.agents.get(tvm.rec.agent_id)
        heard = _last_heard(core, tvm)
        if heard is not None and agent is not None and agent.connected:
            heartbeat_ages.append(max(0.0, now - heard))
    out.metric(
        "tvm_tvms", "gauge", "TVMs by state.", [({"state": s}, n) for s, n in tvm_states.items()]
    )
    out.metric("tvm_pools", "gauge", "Pools.", [({}, len(core.pools))])
    connected = sum(1 for a in core.agents.values() if a.connected)
    free = sum(1 for a in core.agents.values() if a.connected and a.tvm is None)
    out.metric(
        "tvm_agents",
        "gauge",
        "Registered agents by link status.",
        [
            ({"status": "connected"}, connected),
            ({"status": "free"}, free),
            ({"status": "disconnected"}, len(core.agents) - connected),
        ],
    )
    out.metric(
        "tvm_heartbeat_age_max_seconds",
        "gauge",
        "Oldest last-heartbeat age among TVMs with a connected agent.",
        [({}, round(max(heartbeat_ages, default=0.0), 3))],
    )
    cumulative = 0
    buckets: list[tuple[str, dict[str, str], float]] = []
    for bound, n in zip(latency.buckets, latency.counts, strict=False):
        cumulative += n
        buckets.append(("_bucket", {"le": _fmt(bound)}, cumulative))
    buckets.append(("_bucket", {"le": "+Inf"}, latency.observations))
    buckets.append(("_sum", {}, round(latency.total, 6)))
    buckets.append(("_count", {}, latency.observations))
    out.metric(
        "tvm_link_rtt_seconds",
        "histogram",
        "Agent link round trip (Ping until acknowledged) as measured by the coordinator.",
        [],
        buckets,
    )
    out.metric(
        "tvm_link_rtt_max_seconds",
        "gauge",
        "Largest most recent round trip among connected agents.",
        [({}, round(max(latency.last_rtt.values(), default=0.0), 6))],
    )
    out.metric(
        "tvm_recovering",
        "gauge",
        "1 while the coordinator waits for agents after a restart.",
        [({}, 1 if core.recovering_until is not None else 0)],
    )
    out.metric("tvm_http_requests_total", "counter", "REST requests served.", [({}, http_requests)])
    out.metric(
        "tvm_agent_link_events_total",
        "counter",
        "Agent hellos refused, by Reject code (AgentAlreadyConnected: a second connection while the"
        " first is alive), and silent links replaced by a new connection (ReplacedSilentLink).",
        [({"event": k}, n) for k, n in sorted((agent_link_events or {}).items())],
    )
    out.metric(
        "tvm_agent_frames_total",
        "counter",
        "Websocket frames received from and sent to agents (messages share frames when busy).",
        [({"direction": "in"}, agent_frames[0]), ({"direction": "out"}, agent_frames[1])],
    )
    out.metric(
        "tvm_journal_commits_total",
        "counter",
        "Write transactions of the coordinator's state store (each made durable before the answers"
        " and acknowledgements that wait for it).",
        [({}, journal_commits[0])],
    )
    out.metric(
        "tvm_journal_rows_total",
        "counter",
        "Rows those transactions wrote.",
        [({}, journal_commits[1])],
    )
    out.metric(
        "tvm_queue_handbacks_total",
        "counter",
        "Tasks an agent handed back unstarted after waiting in its queue behind a long task.",
        [({}, core.queue_handbacks)],
    )
    if started_at:
        out.metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the coordinator (unix seconds).",
            [({}, round(started_at, 3))],
        )
    return "\n".join(out.lines) + "\n"


# --------------------------------------------------------------------------- Trio shell


@dataclass
class LinkMonitor:
    """What the service keeps for metrics: latency, the placement rate and when it started."""

    latency: LinkLatency = field(default_factory=LinkLatency)
    rate: RateWindow = field(default_factory=RateWindow)
    started_at: float = field(default_factory=time.time)
    interval: float = PING_INTERVAL  # seconds between pings (and placement-rate samples)

    def on_frame(self, agent_id: str, session: str, peer_acked: int) -> None:
        """Called for every frame read from an agent (after its acks were applied)."""
        self.latency.acked(agent_id, session, peer_acked, time.monotonic())

    async def run(self, svc: Any) -> None:
        # `svc` is the CoordinatorService (its `core` and `links`); typed loosely so this module,
        # which the service imports, does not import it back.
        while True:
            now = time.monotonic()
            self.rate.sample(now, svc.core.placements)
            for agent_id, link in list(svc.links.items()):
                if not link.connected:
                    self.latency.forget(agent_id)
                    continue
                if self.latency.pending(agent_id):
                    continue  # one at a time: an unanswered ping is what the heartbeat timeout is for
                seq = link.session.send(pm.Ping())
                self.latency.sent(agent_id, link.session.session_id, seq, now)
                link.poke()
            await trio.sleep(self.interval)


def status_json(svc: Any, monitor: LinkMonitor) -> ClusterStatus:
    return cluster_status(svc.core, monitor.latency, monitor.rate, svc.core.clock())
