"""Memory: coordinator RSS per queued task, and the RSS of an idle agent.

Per queued task: the pure coordinator core (the same `CoordinatorState` the service runs) in this
process; N tasks are added by `add_tasks` in collections of 100 (journal writes are produced and
dropped, as the service hands them to SQLite); value = (RSS after - RSS before) / N, after a full
garbage collection. Task names look like `task-0000001`, command lines like
`/bin/sh -c "render frame 1 --quality high"` (distinct strings per task).

Idle agent: a real `python -m tvmagent` process joined to a pool with nothing running; VmRSS from
/proc after it has been idle for a moment.

    python -m benchmarks.memory [--quick] [--tasks 1000000]
"""

from __future__ import annotations

import gc
import os
import tempfile

import trio

from coordinator.common import models as m
from coordinator.core import CoordinatorState

from ._common import args, coordinator, emit, local_pool, rss_bytes, say, stop_agents


def per_task_bytes(n: int) -> tuple[float, int]:
    core = CoordinatorState("bench", clock=lambda: 1_700_000_000.0)
    core.add_pool(m.PoolAdd(name="p", vm_size="small", target_dedicated=0))
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.take_effects()
    gc.collect()
    before = rss_bytes()
    for start in range(0, n, 100):
        batch = [
            m.TaskAdd(
                name=f"task-{i:07d}", command_line=f'/bin/sh -c "render frame {i} --quality high"'
            )
            for i in range(start, min(n, start + 100))
        ]
        core.add_tasks("wi", "job-0000000001", batch)
        core.take_effects()
    core.schedule()  # nothing to place on (no TVMs): the tasks stay queued
    gc.collect()
    after = rss_bytes()
    queued = len(core.jobs["wi/job-0000000001"].queue)
    if queued != n:
        raise RuntimeError(f"expected {n} queued tasks, found {queued}")
    return (after - before) / n, after


async def idle_agent_rss() -> int:
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        async with coordinator(os.path.join(tmp, "state"), heartbeat_timeout=30.0) as rc:
            procs = await local_pool(rc, tmp, agents=1, slots=1, size="small")
            try:
                await trio.sleep(1.0)
                return rss_bytes(procs[0].pid)
            finally:
                stop_agents(procs)


def main() -> None:
    a = args(__doc__ or "", lambda p: p.add_argument("--tasks", type=int, default=0))
    n = a.tasks or (50_000 if a.quick else 1_000_000)
    per_task, total = per_task_bytes(n)
    emit("coordinator_rss_per_queued_task", {"queued_tasks": n}, per_task, "bytes")
    agent = trio.run(idle_agent_rss)
    emit("idle_agent_rss", {"agents": 1}, agent, "bytes")
    say(
        f"memory: {per_task:.0f} bytes per queued task ({n:,} queued, core process RSS {total / 2**20:.0f} MiB); "
        f"idle agent RSS {agent / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
