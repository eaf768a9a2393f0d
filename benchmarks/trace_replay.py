"""Replay a real batch trace (Standard Workload Format) time-compressed on local agents.

Mapping (one SWF job -> tasks of one TVM Batch job):
- submit time and run time are divided by the compression factor;
- processors -> task slots: the trace machine's processors are scaled onto the local slots
  (procs_per_slot = trace processors / local slots) and a job asking for P processors becomes
  ceil(P / procs_per_slot) tasks, each running the job's compressed run time;
- requested time -> maxWallClockTime (compressed) when the trace has it;
- status 0 (failed) or 5 (cancelled) -> the task exits 1 after its run time.

Results: makespan (first submit to last completion), mean/p50/p90 wait (coordinator receipt ->
process start reported by the agent, per task) and slot utilisation (busy slot-seconds / (slots x
makespan)).

    python -m benchmarks.trace_replay [--quick] [--trace hpc2n|nasa|all] [--compress K] [--max-jobs N]
"""

from __future__ import annotations

import gzip
import math
import os
import tempfile
import time
from dataclasses import dataclass

import trio

from coordinator.client import AsyncClient
from coordinator.common import models as m
from coordinator.core import WALL_CLOCK_EXIT_CODE

from ._common import (
    REPO,
    agents_running,
    args,
    coordinator,
    emit,
    job_finished,
    local_pool,
    percentile,
    say,
    stop_agents,
    wait_until,
)

# In-repo copies first (a clean clone has no ../shared), then the team's shared folder.
TRACES = next(
    (
        d
        for d in (
            os.path.join(REPO, "benchmarks", "traces"),
            os.path.join(os.path.dirname(REPO), "shared", "traces"),
        )
        if os.path.isdir(d)
    ),
    os.path.join(REPO, "benchmarks", "traces"),
)
AGENTS = 2
SLOTS = 8  # per agent (medium: 2 cores, up to 4 x cores)


@dataclass
class TraceSpec:
    label: str
    file: str
    procs: int  # processors of the traced machine
    compress: float  # default compression factor (full run)
    jobs: (
        int  # jobs replayed in a full run (0: all); keeps the task rate within local spawn capacity
    )
    quick_jobs: int
    quick_compress: float


SPECS = {
    "hpc2n": TraceSpec(
        "hpc2n-seth-excerpt", "hpc2n-seth-excerpt.swf", 240, 40_000.0, 0, 60, 100_000.0
    ),
    "nasa": TraceSpec(
        "NASA-iPSC-1993-3.1-cln",
        "NASA-iPSC-1993-3.1-cln.swf.gz",
        128,
        20_000.0,
        5000,
        40,
        100_000.0,
    ),
}


@dataclass
class SwfJob:
    id: int
    submit: float
    run: float
    procs: int
    requested: float  # -1: unknown
    failed: bool


def read_swf(path: str) -> list[SwfJob]:
    opener = gzip.open if path.endswith(".gz") else open
    jobs = []
    with opener(path, "rt") as f:
        for line in f:
            if not line.strip() or line.startswith(";"):
                continue
            x = line.split()
            run = float(x[3])
            procs = int(x[4]) if int(x[4]) > 0 else int(x[7])
            if run < 0 or procs <= 0:
                continue  # no usable run time or size
            jobs.append(
                SwfJob(
                    id=int(x[0]),
                    submit=float(x[1]),
                    run=run,
                    procs=procs,
                    requested=float(x[8]),
                    failed=int(x[10]) in (0, 5),
                )
            )
    jobs.sort(key=lambda j: j.submit)
    return jobs


def command(run_s: float, failed: bool) -> str:
    sleep = f"sleep {run_s:.3f}" if run_s >= 0.001 else "true"
    return (
        f'/bin/sh -c "{sleep}; exit 1"'
        if failed
        else (f"/bin/{sleep}" if sleep == "true" else sleep)
    )


def duration(seconds: float) -> str:
    return f"PT{max(seconds, 0.001):.3f}S"


async def replay(spec: TraceSpec, jobs: list[SwfJob], compress: float) -> dict[str, float]:
    slots = AGENTS * SLOTS
    per_slot = spec.procs / slots
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        async with coordinator(os.path.join(tmp, "state"), heartbeat_timeout=30.0) as rc:
            core = rc.service.core
            procs = await local_pool(rc, tmp, agents=AGENTS, slots=SLOTS, size="medium")
            client = AsyncClient(rc.endpoint, rc.account, rc.key, timeout=120)
            total = 0
            try:
                t0 = time.time()
                base = jobs[0].submit
                async with trio.open_nursery() as nursery:
                    for j in jobs:
                        delay = t0 + (j.submit - base) / compress - time.time()
                        if delay > 0:
                            await trio.sleep(delay)
                        n = max(1, math.ceil(j.procs / per_slot))
                        run_s = j.run / compress
                        constraints = (
                            m.TaskConstraints(max_wall_clock_time=duration(j.requested / compress))
                            if j.requested > 0
                            else None
                        )
                        tasks = [
                            m.TaskAdd(
                                name=f"j{j.id}-{i}",
                                command_line=command(run_s, j.failed),
                                task_constraints=constraints,
                            )
                            for i in range(n)
                        ]
                        total += n
                        # Submitting must not wait on the previous request: a trace does not.
                        nursery.start_soon(
                            client.tasks.add_collection, "wi", "job-0000000001", tasks
                        )
                await wait_until(
                    lambda: (
                        agents_running(procs, tmp)
                        and job_finished(core, "wi/job-0000000001", total)
                    ),
                    3600,
                    "the trace to finish",
                    poll=0.05,
                )
                job = core.jobs["wi/job-0000000001"]
                recs = list(job.tasks.values())
            finally:
                await client.aclose()
                stop_agents(procs)
    first = min(t.created for t in recs)
    last = max(t.state_time for t in recs)
    waits = [max(0.0, (t.start_time or t.state_time) - t.created) for t in recs]
    busy = sum(
        max(0.0, (t.end_time or 0) - (t.start_time or 0))
        for t in recs
        if t.start_time and t.end_time
    )
    makespan = last - first
    return {
        "tasks": len(recs),
        "makespan": makespan,
        "wait_mean": sum(waits) / len(waits) * 1000,
        "wait_p50": percentile(waits, 50) * 1000,
        "wait_p90": percentile(waits, 90) * 1000,
        "utilisation": busy / (slots * makespan) if makespan > 0 else 0.0,
        "nonzero": sum(1 for t in recs if t.exit_code != 0),
        "wall_killed": sum(1 for t in recs if t.exit_code == WALL_CLOCK_EXIT_CODE),
    }


def main() -> None:
    a = args(
        __doc__ or "",
        lambda p: (
            p.add_argument("--trace", choices=["hpc2n", "nasa", "all"], default="all"),
            p.add_argument("--compress", type=float, default=0.0),
            p.add_argument("--max-jobs", type=int, default=0),
        ),
    )
    names = ["hpc2n", "nasa"] if a.trace == "all" else [a.trace]
    for name in names:
        spec = SPECS[name]
        jobs = read_swf(os.path.join(TRACES, spec.file))
        limit = a.max_jobs or (spec.quick_jobs if a.quick else spec.jobs)
        if limit:
            jobs = jobs[:limit]
        compress = a.compress or (spec.quick_compress if a.quick else spec.compress)
        span = (jobs[-1].submit - jobs[0].submit) / compress
        say(
            f"trace {spec.label}: {len(jobs)} jobs over {span:.0f} s compressed (factor {compress:g}), "
            f"{AGENTS} agents x {SLOTS} slots, {spec.procs / (AGENTS * SLOTS):g} trace processors per slot"
        )
        r = trio.run(replay, spec, jobs, compress)
        params = {
            "trace": spec.label,
            "jobs": len(jobs),
            "tasks": r["tasks"],
            "compress": compress,
            "slots": AGENTS * SLOTS,
        }
        emit("trace_makespan", params, r["makespan"], "s")
        emit("trace_wait_mean", params, r["wait_mean"], "ms")
        emit("trace_wait_p50", params, r["wait_p50"], "ms")
        emit("trace_wait_p90", params, r["wait_p90"], "ms")
        emit("trace_slot_utilisation", params, r["utilisation"], "ratio")
        say(
            f"  {r['tasks']} tasks ({r['nonzero']} exited non-zero, {r['wall_killed']} of them stopped at their "
            f"compressed maxWallClockTime): makespan {r['makespan']:.1f} s, "
            f"wait mean {r['wait_mean']:.0f} ms p50 {r['wait_p50']:.0f} ms p90 {r['wait_p90']:.0f} ms, "
            f"slot utilisation {r['utilisation']:.1%}"
        )


if __name__ == "__main__":
    main()
