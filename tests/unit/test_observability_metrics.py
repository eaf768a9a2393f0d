"""Issue 9 §4, pure parts: link-latency bookkeeping, placement rate, cluster summary, Prometheus text."""

from __future__ import annotations

import re

import pytest
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from coordinator.runtime.metrics import LinkLatency, RateWindow, cluster_status, render_prometheus
from protocol import messages as pm


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- latency


def test_rtt_is_measured_when_the_ack_covers_the_ping():
    lat = LinkLatency(buckets=(0.001, 0.01))
    lat.sent("a", "s1", seq=7, now=100.0)
    assert (
        lat.acked("a", "s1", peer_acked=6, now=100.5) is None
    )  # older messages acked, not the ping
    assert lat.pending("a")
    assert lat.acked("a", "s1", peer_acked=9, now=100.004) == pytest.approx(0.004)
    assert not lat.pending("a")
    assert lat.counts == [0, 1, 0]
    assert lat.observations == 1
    assert lat.last_rtt["a"] == pytest.approx(0.004)
    # Acks after that measure nothing more.
    assert lat.acked("a", "s1", peer_acked=10, now=200.0) is None
    assert lat.observations == 1


def test_ping_of_an_earlier_session_never_counts():
    lat = LinkLatency()
    lat.sent("a", "old", seq=50, now=1.0)
    # The link restarted its session: seq 60 there has nothing to do with our ping.
    assert lat.acked("a", "new", peer_acked=60, now=2.0) is None
    assert not lat.pending("a")
    assert lat.observations == 0


def test_forget_drops_pending_and_last_rtt():
    lat = LinkLatency()
    lat.sent("a", "s", 1, 0.0)
    lat.acked("a", "s", 1, 0.002)
    lat.sent("a", "s", 2, 1.0)
    lat.forget("a")
    assert not lat.pending("a")
    assert "a" not in lat.last_rtt
    assert lat.observations == 1  # the histogram keeps what was observed


def test_rate_window():
    r = RateWindow(window=10.0)
    assert r.rate() == 0.0
    r.sample(0.0, 0)
    assert r.rate() == 0.0
    r.sample(5.0, 50)
    assert r.rate() == pytest.approx(10.0)
    for t in range(6, 40):
        r.sample(float(t), 50)  # nothing placed for a while
    assert r.rate() == 0.0
    assert r.samples[-1][0] - r.samples[0][0] <= 11.0


# --------------------------------------------------------------------------- summary and text


def _busy_core() -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0)
    for a in ("a0", "a1", "a2"):
        core.agent_hello(pm.Hello(agent_id=a, token="t"))
    core.add_pool(m.PoolAdd(name="secret-pool", target_dedicated=2))
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(
            name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="secret-pool")
        )
    )
    for i in range(5):
        core.add_task("wi", "job-0000000001", m.TaskAdd(name=f"t{i}", command_line="run"))
    core.schedule()
    runs = [
        (a, msg.spec)
        for a, msg in map(astuple, core.take_effects().sends)
        if isinstance(msg, pm.RunTask)
    ]
    a, spec = runs[0]
    core.agent_message(
        a,
        pm.TaskCompleted(key=spec.key, attempt=spec.attempt, exit_code=0, start_time=1, end_time=2),
    )
    a, spec = runs[1]
    core.agent_message(
        a,
        pm.TaskCompleted(key=spec.key, attempt=spec.attempt, exit_code=3, start_time=1, end_time=2),
    )
    core.schedule()
    core.take_effects()
    clock.now += 4
    return core, clock


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_prometheus_text_counts_and_format():
    core, clock = _busy_core()
    lat = LinkLatency(buckets=(0.001, 0.01))
    lat.sent("a0", "s", 1, 0.0)
    lat.acked("a0", "s", 1, 0.005)
    rate = RateWindow()
    rate.sample(0.0, 0)
    rate.sample(2.0, core.placements)
    text = render_prometheus(core, lat, rate, clock.now, http_requests=12, started_at=5.0)
    s = _samples(text)
    assert s['tvm_tasks{state="active"}'] == 1  # 5 tasks, 2 slots: 2 done, 2 running, 1 queued
    assert s['tvm_tasks{state="running"}'] == 2
    assert s['tvm_tasks{state="completed"}'] == 2
    assert s['tvm_tasks_completed{result="succeeded"}'] == 1
    assert s['tvm_tasks_completed{result="failed"}'] == 1
    assert s["tvm_queue_depth"] == 1
    assert s["tvm_placements_total"] == core.placements == 4
    assert s["tvm_placements_per_second"] == 2.0
    assert s['tvm_tvms{state="running"}'] == 2
    assert s['tvm_tvms{state="unknown"}'] == 0
    assert s['tvm_agents{status="connected"}'] == 3
    assert s['tvm_agents{status="free"}'] == 1
    assert s["tvm_heartbeat_age_max_seconds"] == 4
    assert s['tvm_link_rtt_seconds_bucket{le="0.001"}'] == 0
    assert s['tvm_link_rtt_seconds_bucket{le="0.01"}'] == 1
    assert s['tvm_link_rtt_seconds_bucket{le="+Inf"}'] == 1
    assert s["tvm_link_rtt_seconds_count"] == 1
    assert s["tvm_http_requests_total"] == 12
    # Exposition format: every sample's metric has HELP and TYPE; no resource names leak (the
    # endpoint is unauthenticated).
    typed = set(re.findall(r"^# TYPE (\S+) (?:gauge|counter|histogram)$", text, re.M))
    for name in s:
        base = re.sub(r"(_bucket|_sum|_count)$", "", name.split("{")[0])
        assert base in typed, name
    samples_text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for secret in ("secret-pool", "wi", "a0", "tvm-"):
        assert secret not in samples_text.replace("tvm_", "")
    assert text.endswith("\n")


def test_cluster_status_has_agent_health_per_tvm():
    core, clock = _busy_core()
    lat = LinkLatency()
    some_agent = next(iter(core.tvms.values())).rec.agent_id
    lat.sent(some_agent, "s", 1, 0.0)
    lat.acked(some_agent, "s", 1, 0.003)
    core.agent_disconnected("a1")
    st = cluster_status(core, lat, RateWindow(), clock.now)
    assert (st.tasks.queue_depth, st.tasks.running, st.tasks.succeeded, st.tasks.failed) == (
        1,
        2,
        1,
        1,
    )
    assert [p.name for p in st.pools] == ["secret-pool"]
    assert st.pools[0].tvms == {"running": 2}
    by_agent = {t.agent_id: t for t in st.tvms}
    assert by_agent[some_agent].link_rtt_seconds == pytest.approx(0.003)
    for t in st.tvms:
        assert t.last_heartbeat_age_seconds == 4
        assert t.agent_connected == (t.agent_id != "a1")
    assert st.agents_connected == 2
