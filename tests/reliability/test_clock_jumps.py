"""Clock: the host's wall clock stepping forward or back under the coordinator changes no
wall-clock-limit, retention or timeout outcome. The core is driven as the service drives it (its
clock a `runtime.clock.SteadyClock`), with a fake wall clock and a fake monotonic one."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from coordinator.runtime.clock import SteadyClock
from protocol import messages as pm

J1 = "job-0000000001"
HOUR = 3600.0


class Host:
    """The host's two clocks; `jump` sets the wall clock only, `wait` lets real time pass."""

    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 1000.0

    def jump(self, seconds: float) -> None:
        self.wall += seconds

    def wait(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def _core(host: Host, clock: object = None) -> CoordinatorState:
    core = CoordinatorState(
        "acct",
        clock=clock or SteadyClock(lambda: host.wall, lambda: host.mono),  # type: ignore[arg-type]
        heartbeat_timeout=10.0,
        account_url="http://coord:1",
    )
    core.agent_hello(pm.Hello(agent_id="a0", token="t", cores=4))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, vm_size="large"))
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    return core


def _live(core: CoordinatorState, host: Host, seconds: float, step: float = 1.0) -> None:
    """`seconds` pass in ticks of `step`, the agent heartbeating before each tick."""
    left = seconds
    while left > 1e-9:
        dt = min(step, left)
        host.wait(dt)
        left -= dt
        core.agent_message("a0", pm.Heartbeat())
        core.tick()


def _job_with_limit(core: CoordinatorState, limit: str) -> None:
    core.add_workitem(
        m.WorkitemAdd(
            name="wi",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            job_constraints=m.JobConstraints(max_wall_clock_time=limit),
        )
    )
    core.add_task("wi", J1, m.TaskAdd(name="t", command_line="run"))
    core.schedule()


@pytest.mark.parametrize("jump", [HOUR, -HOUR, 5.0, -5.0])
def test_job_wall_clock_limit_counts_elapsed_time_not_clock_steps(jump: float) -> None:
    host = Host()
    core = _core(host)
    _job_with_limit(core, "PT10M")
    _live(core, host, 60)
    host.jump(jump)
    _live(core, host, 8 * 60)  # 9 minutes in
    job = core.get_job("wi", J1)
    assert job.rec.state == "active", f"ended after 9 min with a {jump:+g} s step"
    _live(core, host, 90)  # 10.5 minutes in (1 % slew at most: 6 s)
    assert job.rec.terminate_reason == "MaxWallClockTimeExpiry"


def test_without_the_steady_clock_a_forward_step_would_end_the_job() -> None:
    """The control: the raw wall clock gets it wrong, so the test above can fail."""
    host = Host()
    core = _core(host, clock=lambda: host.wall)
    _job_with_limit(core, "PT10M")
    _live(core, host, 60)
    host.jump(HOUR)
    _live(core, host, 1)
    assert core.get_job("wi", J1).rec.terminate_reason == "MaxWallClockTimeExpiry"


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_heartbeat_timeout_unchanged_by_steps(jump: float) -> None:
    host = Host()
    core = _core(host)
    tvm = next(iter(core.tvms.values()))
    _live(core, host, 5)
    host.jump(jump)  # between two heartbeats
    core.tick()
    assert not [c for c in core.take_effects().closes if c.code == 4008]
    _live(core, host, 5)
    assert tvm.rec.state == "idle", "a live agent was declared lost by a clock step"
    # Silence: lost after the heartbeat timeout (10 s) of elapsed time, whatever the step.
    host.jump(-jump)
    for _ in range(9):
        host.wait(1)
        core.tick()
    assert tvm.rec.state == "idle"
    for _ in range(3):
        host.wait(1)
        core.tick()
    assert tvm.rec.state == "unknown"


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_limits_sent_to_agents_are_durations(jump: float) -> None:
    """Task maxWallClockTime and retentionTime are enforced on the agent from durations the
    RunTask carries: a step on the coordinator does not shorten or stretch them."""
    host = Host()
    core = _core(host)
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    _live(core, host, 30)
    host.jump(jump)
    core.add_task(
        "wi",
        J1,
        m.TaskAdd(
            name="t",
            command_line="run",
            task_constraints=m.TaskConstraints(max_wall_clock_time="PT5M", retention_time="PT2H"),
        ),
    )
    core.schedule()
    specs = [s.msg.spec for s in core.take_effects().sends if isinstance(s.msg, pm.RunTask)]
    assert [(s.max_wall_clock_s, s.retention_s) for s in specs] == [(300.0, 7200.0)]


def test_steady_clock_absorbs_steps_and_converges() -> None:
    host = Host()
    clock = SteadyClock(lambda: host.wall, lambda: host.mono)
    t0 = clock()
    host.wait(10)
    assert clock() == pytest.approx(t0 + 10)
    host.jump(-HOUR)
    t1 = clock()
    assert t1 >= t0 + 10  # never backwards
    host.wait(100)
    assert clock() - t1 == pytest.approx(100, rel=0.011)
    assert clock.steps == 1
    # Converges: after 100 x the step, the clock is the wall clock again.
    host.wait(HOUR * 101)
    assert clock() == pytest.approx(host.wall)
    assert clock.offset == 0.0
    # A small disagreement (NTP slewing, a late reading) is not a step.
    host.wall += 0.5
    assert clock() == pytest.approx(host.wall)
    assert clock.steps == 1
