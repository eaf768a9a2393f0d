"""Placement throughput: a real coordinator, K simulated agents on real websocket links (a separate
process, answering every RunTask at once), N tasks added by add-task-collection from a separate
submitter process. Value: tasks/s from the first submit to the last completion recorded.

    python -m benchmarks.placement [--quick] [--agents 10,100,1000] [--tasks 100000] [--slots 16]
        [--concurrency 32] [--fill spread|pack] [--dashboard] [--agent-queue on|off]

--agent-queue (default on): the simulated agents say they keep a task queue, as real agents do, so
the coordinator may place short tasks beyond their slots; off: slots only, as before.

--dashboard keeps a dashboard open during the run (benchmarks/_uiwatch.py: the overview's and the
job's live feeds, as a browser would).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import trio

from coordinator.common import models as m

from ._common import (
    args,
    coordinator,
    emit,
    job_finished,
    link_frames,
    pool_ready,
    say,
    spawn,
    stop,
    wait_until,
)


async def run_one(
    k: int,
    n: int,
    slots: int,
    size: str,
    concurrency: int,
    fill: str = "spread",
    dashboard: bool = False,
    queue: bool = True,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        async with coordinator(
            os.path.join(tmp, "state"), heartbeat_timeout=120.0, max_pool_size=max(1000, k)
        ) as rc:
            svc = rc.service
            core = svc.core
            sims = spawn(
                "benchmarks._simagents",
                ["--url", rc.agent_url, "--count", str(k), *(["--queue"] if queue else [])],
                env={"TVM_AGENT_TOKEN": rc.join_token},
                stdout=None,
            )
            try:
                await wait_until(
                    lambda: sum(1 for a in core.agents.values() if a.connected) >= k,
                    60 + k / 10,
                    f"{k} simulated agents",
                )
                await svc.execute(
                    core.add_pool,
                    m.PoolAdd(
                        name="bench",
                        vm_size=size,
                        target_dedicated=k,
                        max_tasks_per_vm=slots,
                        tvm_fill_type=fill,
                    ),
                )
                await wait_until(lambda: pool_ready(core, "bench", k), 60, f"{k} ready TVMs")
                await svc.execute(
                    core.add_workitem,
                    m.WorkitemAdd(
                        name="wi",
                        job_execution_environment=m.JobExecutionEnvironment(pool_name="bench"),
                    ),
                )
                ui = rc.app.ui.feed
                ui0 = ui.computed
                watch = (
                    spawn(
                        "benchmarks._uiwatch",
                        [
                            "--endpoint",
                            rc.endpoint,
                            "--account",
                            rc.account,
                            "--view",
                            "overview",
                            "--view",
                            "job:wi/job-0000000001",
                        ],
                        env={"TVM_KEY": rc.key},
                    )
                    if dashboard
                    else None
                )
                if watch is not None:  # both feeds open before the clock starts
                    await wait_until(lambda: ui.computed >= ui0 + 2, 30, "the dashboard's feeds")
                    ui0 = ui.computed
                busy0 = ui.busy
                sub = spawn(
                    "benchmarks._submit",
                    [
                        "--endpoint",
                        rc.endpoint,
                        "--account",
                        rc.account,
                        "--workitem",
                        "wi",
                        "--job",
                        "job-0000000001",
                        "--n",
                        str(n),
                        "--concurrency",
                        str(concurrency),
                    ],
                    env={"TVM_KEY": rc.key},
                )
                commits0 = svc.journal.commits
                frames0 = link_frames(svc)
                cpu0 = time.process_time()
                sims0 = proc_cpu(sims.pid)
                try:
                    await wait_until(
                        lambda: job_finished(core, "wi/job-0000000001", n), 600, f"{n} completions"
                    )
                    done = time.time()
                    frames = link_frames(svc)
                    cpu = time.process_time() - cpu0
                    sims_cpu = proc_cpu(sims.pid) - sims0
                    sub_cpu = proc_cpu(
                        sub.pid
                    )  # exited or about to: a zombie's /proc entry still counts
                    out, _ = await trio.to_thread.run_sync(sub.communicate)
                finally:
                    stop(sub)
                    if watch is not None:
                        stop(watch)
                times = json.loads(out)
                if times.get("failures"):
                    raise RuntimeError(f"{times['failures']} tasks were refused")
                return {
                    "elapsed": done - times["first"],
                    "submit_s": times["last"] - times["first"],
                    "commits": svc.journal.commits - commits0,
                    "frames_in": frames[0] - frames0[0],
                    "frames_out": frames[1] - frames0[1],
                    "cpu": cpu,
                    "sims_cpu": sims_cpu,
                    # from its first request on (its interpreter's start is not the run's)
                    "sub_cpu": times.get("cpu", sub_cpu),
                    "ui_snapshots": ui.computed - ui0,
                    "ui_busy": ui.busy - busy0,
                }
            finally:
                stop(sims)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    a = args(
        __doc__ or "",
        lambda p: (
            p.add_argument("--agents", default=""),
            p.add_argument("--tasks", type=int, default=0),
            p.add_argument("--slots", type=int, default=16),
            p.add_argument("--concurrency", type=int, default=32),
            p.add_argument("--fill", choices=["spread", "pack"], default="spread"),
            p.add_argument("--dashboard", action="store_true"),
            p.add_argument("--agent-queue", choices=["on", "off"], default="on"),
        ),
    )
    ks = (
        [int(x) for x in a.agents.split(",")]
        if a.agents
        else ([10] if a.quick else [10, 100, 1000])
    )
    n = a.tasks or (3000 if a.quick else 100_000)
    size = "extralarge" if a.slots > 16 else "large"
    for k in ks:
        queue = a.agent_queue == "on"
        r = trio.run(run_one, k, n, a.slots, size, a.concurrency, a.fill, a.dashboard, queue)
        rate = n / r["elapsed"]
        emit(
            "placement",
            {
                "agents": k,
                "tasks": n,
                "slots_per_agent": a.slots,
                "submit_concurrency": a.concurrency,
                "fill": a.fill,
                "dashboard": a.dashboard,
                "agent_queue": queue,
            },
            rate,
            "tasks/s",
        )
        # Everything runs on this machine's CPUs: what the simulated agents and the submitter
        # spend per task bounds the rate before the coordinator spends anything.
        cpus = os.cpu_count() or 1
        harness = (r["sims_cpu"] + r["sub_cpu"]) / n
        whole = harness + r["cpu"] / n
        bound = {"cpus": cpus, "agents": k, "tasks": n}
        emit(
            "placement_bound_free_coordinator", bound, cpus / harness if harness else 0.0, "tasks/s"
        )
        emit("placement_bound_all_cpu", bound, cpus / whole if whole else 0.0, "tasks/s")
        say(
            f"placement: K={k} agents x {a.slots} slots (agent queues {a.agent_queue}), {n} tasks: "
            f"{rate:,.0f} tasks/s "
            f"({r['elapsed']:.2f} s; submitting alone took {r['submit_s']:.2f} s; {r['commits']} journal commits; "
            f"frames in/out {r['frames_in']}/{r['frames_out']}; "
            f"CPU per task: coordinator {r['cpu'] / n * 1e6:.0f} µs, simulated agents {r['sims_cpu'] / n * 1e6:.0f} µs, "
            f"submitter {r['sub_cpu'] / n * 1e6:.0f} µs; "
            f"load average {os.getloadavg()[0]:.1f}"
            + (
                f"; dashboard open: {r['ui_snapshots']} feed snapshots took "
                f"{r['ui_busy'] * 1000:.0f} ms, {r['ui_busy'] / r['elapsed']:.1%} of the run"
                if a.dashboard
                else ""
            )
            + ")"
        )
        say(
            f"placement: on {cpus} CPUs shared with the harness (simulated agents + submitter, "
            f"{harness * 1e6:.0f} µs per task) the rate cannot exceed {cpus / harness:,.0f} tasks/s "
            f"even for a coordinator costing nothing; with its measured CPU, {cpus / whole:,.0f}/s; "
            f"its Python runs on one CPU at a time (one interpreter lock): at most "
            f"{n / r['cpu']:,.0f}/s at its {r['cpu'] / n * 1e6:.0f} µs per task"
            if harness and whole and r["cpu"]
            else "placement: no CPU figures for the harness"
        )


if __name__ == "__main__":
    main()
