"""Latency on an idle pool: submit→start and submit→complete, p50/p99 over single tasks added one
at a time (each waits for the previous one to finish) through the REST API.

submit = client clock just before the POST; start = the agent's report of the process start (same
host, same clock); complete = the moment the coordinator's record shows the task completed (polled
every 0.2 ms in this process, which hosts the coordinator).

    python -m benchmarks.latency [--quick] [--tasks 1000] [--task-isolation users|none]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import trio

from coordinator.client import AsyncClient

from ._common import args, coordinator, emit, local_pool, percentile, say, stop_agents, wait_until

JOB = "wi/job-0000000001"


async def run(n: int) -> tuple[list[float], list[float]]:
    starts: list[float] = []
    completes: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        async with coordinator(os.path.join(tmp, "state"), heartbeat_timeout=30.0) as rc:
            core = rc.service.core
            procs = await local_pool(rc, tmp, agents=2, slots=2, size="medium")
            client = AsyncClient(rc.endpoint, rc.account, rc.key)
            try:
                for i in range(n + 5):  # the first few warm up connections and caches
                    name = f"t{i:05d}"
                    t0 = time.time()
                    await client.tasks.add("wi", "job-0000000001", name, "/bin/true")
                    job = core.jobs[JOB]
                    task = job.tasks[name]
                    await wait_until(
                        lambda t=task: t.state == "completed", 30, f"task {name}", poll=0.0002
                    )
                    done = time.time()
                    if task.exit_code != 0 or task.start_time is None:
                        raise RuntimeError(
                            f"task {name} failed: exit {task.exit_code} {task.failure}"
                        )
                    if i >= 5:
                        starts.append((task.start_time - t0) * 1000)
                        completes.append((done - t0) * 1000)
            finally:
                await client.aclose()
                stop_agents(procs)
    return starts, completes


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
    os.environ["TVM_AGENT_TASK_ISOLATION"] = a.task_isolation  # read by the agents at start
    n = a.tasks or (50 if a.quick else 1000)
    starts, completes = trio.run(run, n)
    params = {
        "tasks": n,
        "agents": 2,
        "slots_per_agent": 2,
        "command": "/bin/true",
        "task_isolation": a.task_isolation,
    }
    for label, values in (("submit_to_start", starts), ("submit_to_complete", completes)):
        for q in (50, 99):
            emit(f"latency_{label}_p{q}", params, percentile(values, q), "ms")
    say(
        f"latency over {n} single tasks (task isolation {a.task_isolation}): submit→start p50 {percentile(starts, 50):.2f} ms, "
        f"p99 {percentile(starts, 99):.2f} ms; submit→complete p50 {percentile(completes, 50):.2f} ms, "
        f"p99 {percentile(completes, 99):.2f} ms"
    )


if __name__ == "__main__":
    main()
