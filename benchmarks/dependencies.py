"""Task dependencies: what they cost.

1. A DAG of N tasks (default 10,000) on a real coordinator (REST-free: the core's commands through
   the service, so the SQLite journal and the agent links are real) with K simulated agents
   (benchmarks/_simagents.py: real websocket links answering every RunTask at once), against the
   same N tasks without dependencies. The DAG has L layers; every task of a layer depends on up to
   3 tasks of the layer before. Values: the seconds from the first add to the last completion,
   the ratio of the two, and the coordinator's CPU per task in both.
2. The pure core alone (no I/O): a 100,000-task chain (each task depends on the one before) and a
   100,000-task fan-in (one task depends on all the others through one taskIdRange), each added
   in collections of 100 and run to the end on two simulated TVMs, against the same tasks without
   dependencies. Linear, not quadratic: the per-task cost at 10,000 and at 100,000 is printed.

    python -m benchmarks.dependencies [--quick] [--tasks 10000] [--layers 100] [--agents 10]
        [--core-tasks 100000]
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Any

import trio

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from protocol import messages as pm

from ._common import args, coordinator, emit, pool_ready, say, spawn, stop, wait_until

JOB = "job-0000000001"


# --------------------------------------------------------------------------- 1. real coordinator


def dag(n: int, layers: int, seed: int = 7) -> list[m.TaskAdd]:
    """`n` tasks in `layers` layers; each task after the first layer depends on up to 3 of the
    layer before (parents always come first in the list)."""
    rnd = random.Random(seed)
    width = max(1, n // layers)
    out: list[m.TaskAdd] = []
    prev: list[str] = []
    for i in range(n):
        if i % width == 0 and i:
            prev = [t.name for t in out[i - width : i]]
        parents = rnd.sample(prev, min(3, len(prev))) if prev else []
        out.append(
            m.TaskAdd(
                name=f"t{i}",
                command_line="/bin/true",
                depends_on=m.TaskDependencies(task_ids=parents) if parents else None,
            )
        )
    return out


async def run_real(k: int, tasks: list[m.TaskAdd], uses_deps: bool) -> dict[str, float]:
    n = len(tasks)
    with tempfile.TemporaryDirectory(prefix="tvm-bench-deps-") as tmp:
        async with coordinator(os.path.join(tmp, "state"), heartbeat_timeout=120.0) as rc:
            svc, core = rc.service, rc.service.core
            sims = spawn(
                "benchmarks._simagents",
                ["--url", rc.agent_url, "--count", str(k)],
                env={"TVM_AGENT_TOKEN": rc.join_token},
                stdout=None,
            )
            try:
                await wait_until(
                    lambda: sum(1 for a in core.agents.values() if a.connected) >= k,
                    60,
                    f"{k} simulated agents",
                )
                await svc.execute(
                    core.add_pool,
                    m.PoolAdd(
                        name="bench", vm_size="large", target_dedicated=k, max_tasks_per_vm=16
                    ),
                )
                await wait_until(lambda: pool_ready(core, "bench", k), 60, f"{k} ready TVMs")
                await svc.execute(
                    core.add_workitem,
                    m.WorkitemAdd(
                        name="wi",
                        job_execution_environment=m.JobExecutionEnvironment(pool_name="bench"),
                        uses_task_dependencies=uses_deps,
                    ),
                )
                done0 = core.completions
                cpu0 = time.process_time()
                t0 = time.perf_counter()
                for i in range(0, n, 100):
                    res = await svc.execute(core.add_tasks, "wi", JOB, tasks[i : i + 100])
                    bad = [r for r in res if r.status != "success"]
                    if bad:
                        raise RuntimeError(f"refused: {bad[0]}")
                # Every result recorded (no retries here): a cheap check, the same for both runs.
                await wait_until(lambda: core.completions - done0 >= n, 600, f"{n} done", 0.01)
                return {"elapsed": time.perf_counter() - t0, "cpu": time.process_time() - cpu0}
            finally:
                stop(sims)


# --------------------------------------------------------------------------- 2. the pure core


def _core(uses_deps: bool) -> CoordinatorState:
    core = CoordinatorState("bench", heartbeat_timeout=1e9)
    for i in range(2):
        core.agent_hello(
            pm.Hello(agent_id=f"a{i}", token="t", ip_address="10.0.0.1", hostname=f"a{i}")
        )
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2, max_tasks_per_vm=16, vm_size="large"))
    for tvm in list(core.tvms.values()):
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(
            name="wi",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            uses_task_dependencies=uses_deps,
        )
    )
    core.take_effects()
    return core


def run_core(shape: str, n: int) -> tuple[float, int]:
    """Seconds to add and run `n` tasks of `shape` (chain | fanin | flat) in the pure core."""
    core = _core(shape != "flat")
    if shape == "chain":
        tasks = [
            m.TaskAdd(
                name=str(i),
                command_line="x",
                depends_on=m.TaskDependencies(task_ids=[str(i - 1)]) if i else None,
            )
            for i in range(n)
        ]
    else:
        tasks = [m.TaskAdd(name=str(i), command_line="x") for i in range(n - 1)]
        sink = m.TaskDependencies(task_id_ranges=[m.TaskIdRange(start=0, end=n - 2)])
        tasks.append(
            m.TaskAdd(name="sink", command_line="x", depends_on=sink if shape == "fanin" else None)
        )
    t0 = time.perf_counter()
    for i in range(0, n, 100):
        core.add_tasks("wi", JOB, tasks[i : i + 100])
        core.take_effects()
    ran = 0
    while True:
        core.schedule()
        fx = core.take_effects()
        runs = [(x.agent_id, x.msg.spec) for x in fx.sends if isinstance(x.msg, pm.RunTask)]
        if not runs:
            break
        for agent, spec in runs:
            core.agent_message(
                agent,
                pm.TaskCompleted(
                    key=spec.key, attempt=spec.attempt, exit_code=0, start_time=0.0, end_time=0.0
                ),
            )
            ran += 1
        core.take_effects()
    return time.perf_counter() - t0, ran


def main() -> None:
    a = args(
        __doc__ or "",
        lambda p: (
            p.add_argument("--tasks", type=int, default=0),
            p.add_argument("--layers", type=int, default=100),
            p.add_argument("--agents", type=int, default=10),
            p.add_argument("--core-tasks", type=int, default=0),
        ),
    )
    n = a.tasks or (1000 if a.quick else 10_000)
    layers = min(a.layers, n)
    core_n = a.core_tasks or (10_000 if a.quick else 100_000)

    graph = dag(n, layers)
    edges = sum(len(t.depends_on.task_ids) for t in graph if t.depends_on)
    flat = [m.TaskAdd(name=t.name, command_line=t.command_line) for t in graph]
    r_flat = trio.run(run_real, a.agents, flat, False)
    r_dag = trio.run(run_real, a.agents, graph, True)
    params: dict[str, Any] = {"tasks": n, "layers": layers, "edges": edges, "agents": a.agents}
    emit("deps_dag_elapsed", params, r_dag["elapsed"], "s")
    emit("deps_flat_elapsed", params, r_flat["elapsed"], "s")
    emit("deps_dag_overhead_ratio", params, r_dag["elapsed"] / r_flat["elapsed"], "ratio")
    emit("deps_dag_cpu_per_task", params, r_dag["cpu"] / n * 1000, "ms")
    emit("deps_flat_cpu_per_task", params, r_flat["cpu"] / n * 1000, "ms")
    say(
        f"dependencies: a {n}-task DAG ({layers} layers, {edges} edges) on {a.agents} simulated "
        f"agents ran in {r_dag['elapsed']:.2f} s vs {r_flat['elapsed']:.2f} s without dependencies "
        f"(x{r_dag['elapsed'] / r_flat['elapsed']:.2f}); coordinator CPU per task "
        f"{r_dag['cpu'] / n * 1e3:.3f} ms vs {r_flat['cpu'] / n * 1e3:.3f} ms"
    )

    sizes = sorted({core_n // 10, core_n})
    for shape in ("flat", "chain", "fanin"):
        per: list[str] = []
        for size in sizes:
            secs, ran = run_core(shape, size)
            if ran != size:
                raise RuntimeError(f"{shape} {size}: {ran} tasks ran")
            emit(f"deps_core_{shape}", {"tasks": size}, secs, "s")
            per.append(f"{size}: {secs:.2f} s ({secs / size * 1e6:.1f} us/task)")
        say(f"dependencies: core {shape:5s} " + ", ".join(per))


if __name__ == "__main__":
    main()
