"""Clock suite: the host's wall clock stepped forward and back under the coordinator's core (the
service's `SteadyClock` over a fake wall clock and a fake monotonic one, ticked once a second, the agent heartbeating every 2 s).
Per step: when a job with maxWallClockTime PT10M really ended (elapsed seconds; 600 is right),
and whether a live agent was declared lost; beside the same with the raw wall clock as the core's
clock, which is what the coordinator did before.

    python -m benchmarks.reliability.clock
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from coordinator.runtime.clock import SteadyClock
from protocol import messages as pm

JOB = "job-0000000001"
LIMIT_S = 600
STEPS = (-86400.0, -3600.0, -5.0, 5.0, 3600.0, 86400.0)


class _Host:
    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 1000.0


def _scenario(step: float, steady: bool) -> dict:
    host = _Host()
    clock: Callable[[], float] = (
        SteadyClock(lambda: host.wall, lambda: host.mono) if steady else (lambda: host.wall)
    )
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0, account_url="http://c:1")
    core.agent_hello(pm.Hello(agent_id="a0", token="t", cores=4))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, vm_size="large"))
    tvm = next(iter(core.tvms.values()))
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(
            name="wi",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            job_constraints=m.JobConstraints(max_wall_clock_time=f"PT{LIMIT_S}S"),
        )
    )
    job = core.get_job("wi", JOB)
    ended_at = None
    lost = False
    for second in range(1, 2 * LIMIT_S):
        host.wall += 1
        host.mono += 1
        if second % 2 == 0:  # the agent heartbeats every 2 s (a quarter of the 10 s timeout)
            core.agent_message("a0", pm.Heartbeat())
        if second == 61:  # the step, between two heartbeats
            host.wall += step
        core.tick()
        fx = core.take_effects()
        lost = lost or tvm.rec.state == "unknown" or any(c.code == 4008 for c in fx.closes)
        if ended_at is None and job.rec.terminate_reason == "MaxWallClockTimeExpiry":
            ended_at = second
    return {
        "suite": "clock",
        "clock": "steady" if steady else "raw wall clock",
        "step_s": step,
        "job_limit_s": LIMIT_S,
        "job_ended_after_s": ended_at,
        "live_agent_declared_lost": lost,
    }


def run(full: bool) -> list[dict]:
    return [_scenario(step, steady) for steady in (True, False) for step in STEPS]


def main() -> None:
    for row in run("--full" in sys.argv[1:]):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
