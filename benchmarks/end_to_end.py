"""End-to-end throughput with real agents: 2 local agents, maxTasksPerVM = 2, every task
`/bin/true`, added by add-task-collection. Compared with the raw spawn rate of this machine measured
in the same run: a plain loop of `/bin/true` spawns (subprocess, wait) with the same concurrency
(4 = 2 agents x 2 slots) and no coordinator.

The agents run as root, so by default each task runs as its own Linux user (`--task-isolation
users`: a `setpriv` exec and a chown of the task directory per task, which the raw loop does not
do); `--task-isolation none` runs tasks as the agent's user. Both keep the per-task cgroup.

    python -m benchmarks.end_to_end [--quick] [--tasks 2000] [--task-isolation users|none]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time

import trio

from coordinator.client import AsyncClient, add_many_async
from coordinator.common import models as m

from ._common import args, coordinator, emit, job_finished, local_pool, say, stop_agents, wait_until

AGENTS = 2
SLOTS = 2


def raw_spawn_rate(n: int, concurrency: int) -> float:
    """Spawns per second of `/bin/true` with `concurrency` threads each spawning and waiting."""
    left = [n]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            subprocess.run(["/bin/true"], check=True)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n / (time.perf_counter() - t0)


async def run(n: int) -> float:
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        async with coordinator(os.path.join(tmp, "state"), heartbeat_timeout=30.0) as rc:
            core = rc.service.core
            procs = await local_pool(rc, tmp, agents=AGENTS, slots=SLOTS, size="medium")
            client = AsyncClient(rc.endpoint, rc.account, rc.key, timeout=300)
            try:
                tasks = [m.TaskAdd(name=f"t{i:06d}", command_line="/bin/true") for i in range(n)]
                t0 = time.time()
                results = await add_many_async(client, "wi", "job-0000000001", tasks)
                if any(r.status != "success" for r in results):
                    raise RuntimeError("some tasks were refused")
                await wait_until(
                    lambda: job_finished(core, "wi/job-0000000001", n), 600, f"{n} tasks", poll=0.01
                )
                elapsed = time.time() - t0
                job = core.jobs["wi/job-0000000001"]
                failed = sum(1 for t in job.tasks.values() if t.exit_code != 0)
                if failed:
                    bad = next(t for t in job.tasks.values() if t.exit_code != 0)
                    raise RuntimeError(
                        f"{failed} tasks failed, e.g. {bad.name}: exit code {bad.exit_code}, "
                        f"{bad.failure}"
                    )
            finally:
                await client.aclose()
                stop_agents(procs)
    return n / elapsed


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=int, default=0)
    p.add_argument(
        "--task-isolation",
        choices=("users", "none"),
        default="users",
        help="how the (root) agents run tasks: each as its own Linux user, or as root",
    )


def main() -> None:
    a = args(__doc__ or "", _options)
    # The agents read it at start (child_env copies this process's environment).
    os.environ["TVM_AGENT_TASK_ISOLATION"] = a.task_isolation
    n = a.tasks or (200 if a.quick else 3000)
    concurrency = AGENTS * SLOTS
    raw_before = raw_spawn_rate(n, concurrency)
    rate = trio.run(run, n)
    raw_after = raw_spawn_rate(n, concurrency)
    raw = (
        raw_before + raw_after
    ) / 2  # measured on both sides of the run: drift shows up in the spread
    params = {
        "tasks": n,
        "agents": AGENTS,
        "slots_per_agent": SLOTS,
        "command": "/bin/true",
        "task_isolation": a.task_isolation,
    }
    emit("end_to_end", params, rate, "tasks/s")
    emit(
        "raw_spawn",
        {"spawns": n, "concurrency": concurrency, "command": "/bin/true"},
        raw,
        "tasks/s",
    )
    emit("end_to_end_ratio", params, rate / raw, "ratio")
    say(
        f"end_to_end: {n} tasks of /bin/true on {AGENTS} agents x {SLOTS} slots, task isolation "
        f"{a.task_isolation}: {rate:,.0f} tasks/s; "
        f"raw spawn {raw:,.0f}/s (before {raw_before:,.0f}, after {raw_after:,.0f}); ratio {rate / raw:.2f}"
    )


if __name__ == "__main__":
    main()
