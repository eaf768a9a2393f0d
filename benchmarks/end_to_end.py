"""End-to-end throughput with real agents: 2 local agents, maxTasksPerVM = 2, every task
`/bin/true`, added by add-task-collection from a separate submitter process (`_submit`: 100 tasks a
request, 4 connections), timed from the first request to the last completion. In the same run:
the raw spawn rate of this machine (a plain loop of `/bin/true` spawns with the same concurrency,
4 = 2 agents x 2 slots, no scheduler; measured before and after) and the peers of `benchmarks.peers`
(HyperQueue, Dask: skipped with a note when not installed; `pip install -e '.[bench]'`).

Two ways to run TVM Batch (`--coordinator`):
- `inproc` (default): the coordinator in this process, agents as processes; completion seen on the
  coordinator's record (polled every 10 ms).
- `up`: a default `tvm up` started as a subprocess (its state in a temporary directory), the pool
  created and the tasks added over signed REST, completion seen by the client over REST.

CPU per task of every process, from /proc and getrusage over the measured interval: the coordinator
(this process in `inproc`, which also polls; the daemon in `up`), each agent's own time, the task
side (everything below the agents: exec chain, launchers, the tasks), and the submitter (from its
first request on).

The agents run as root, so by default each task runs as its own Linux user; `--task-isolation none`
runs tasks as the agent's user. Both keep the per-task cgroup.

`--stock` (inproc): the job as it meets long-lived agents that have run a job like it before. Each
agent is started with TVM_AGENT_TASKDIR_STOCK set to its share of the tasks (at most the 2,048
directories an agent keeps), and the job is submitted once every agent has made that many task
directories ahead (an agent does so while idle after a burst of that size; made before the clock
starts, their CPU is not in the figures).

    python -m benchmarks.end_to_end [--quick] [--tasks 3000] [--task-isolation users|none]
                                    [--coordinator inproc|up] [--peers hyperqueue,dask|none]
                                    [--stock]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import trio

from coordinator.client import AsyncClient
from tvmagent.runner import STOCK_ENV
from tvmagent.taskdirs import STOCK_MOST, stock_on_disk

from ._common import (
    agents_running,
    args,
    coordinator,
    emit,
    job_finished,
    journal_commits,
    link_frames,
    local_pool,
    raw_spawn_rate,
    say,
    scraped_counters,
    spawn,
    stop_agents,
    task_run_options,
    wait_until,
)
from ._cpu import TreeCpu, per_task_ms, proc_times, self_cpu, tree_cpu
from ._daemon import JOB, WORKITEM, UpDaemon, ready_pool
from .peers import PEERS, PeerResult, peer_results, report

AGENTS = 2
SLOTS = 2


@dataclass
class Run:
    rate: float
    cpu_ms: dict[str, float] = field(default_factory=dict)  # process kind -> CPU ms per task
    frames: tuple[int, int] | None = None  # agent link frames in, out
    commits: int | None = None  # the coordinator's store transactions


def _submitter(endpoint: str, account: str, key: str, n: int) -> subprocess.Popen[bytes]:
    argv = ["--endpoint", endpoint, "--account", account, "--workitem", WORKITEM, "--job", JOB]
    return spawn("benchmarks._submit", [*argv, "--n", str(n)], env={"TVM_KEY": key})


async def _submitted(proc: subprocess.Popen[bytes]) -> dict[str, float]:
    """The submitter's {"first", "last", "failures", "cpu"}."""
    out, _ = await trio.to_thread.run_sync(proc.communicate)
    if proc.returncode != 0:
        raise RuntimeError(f"submitter failed with exit code {proc.returncode}")
    res: dict[str, float] = json.loads(out)
    if res.get("failures"):
        raise RuntimeError(f"{res['failures']} tasks were refused")
    return res


def _cpu_table(
    n: int,
    coordinator_s: float,
    agents: list[TreeCpu],
    client_s: float,
) -> dict[str, float]:
    out = {"coordinator": per_task_ms(coordinator_s, n)}
    for i, a in enumerate(agents):
        out[f"agent{i}"] = per_task_ms(a.own, n)
    out["agents"] = per_task_ms(sum(a.own for a in agents), n)
    out["task_side"] = per_task_ms(sum(a.children for a in agents), n)
    out["submitter"] = per_task_ms(client_s, n)
    return out


def _stocked(base: str, per_agent: int) -> bool:
    return all(
        stock_on_disk(os.path.join(base, "agents", f"agent{i}")) >= per_agent for i in range(AGENTS)
    )


async def run_inproc(n: int, stock: bool = False) -> Run:
    per_agent = min(-(-n // AGENTS), STOCK_MOST)  # the rest are made while the job runs
    if stock:
        os.environ[STOCK_ENV] = str(per_agent)  # the agents read it at start (child_env copies it)
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        async with coordinator(os.path.join(tmp, "state"), heartbeat_timeout=30.0) as rc:
            core = rc.service.core
            procs = await local_pool(rc, tmp, agents=AGENTS, slots=SLOTS, size="medium")
            try:
                if stock:
                    await wait_until(
                        lambda: agents_running(procs, tmp) and _stocked(tmp, per_agent),
                        120,
                        f"{per_agent} task directories made ahead by each agent",
                    )
                me, agents = self_cpu(), [tree_cpu(p.pid) for p in procs]
                commits0 = journal_commits(rc.service)
                sub = _submitter(rc.endpoint, rc.account, rc.key, n)
                try:
                    await wait_until(
                        lambda: (
                            agents_running(procs, tmp)
                            and job_finished(core, f"{WORKITEM}/{JOB}", n)
                        ),
                        600,
                        f"{n} tasks",
                        poll=0.01,
                    )
                    done = time.time()
                    times = await _submitted(sub)
                finally:
                    if sub.poll() is None:
                        sub.kill()
                        sub.wait()
                me_used = self_cpu() - me
                frames = link_frames(rc.service)
                commits = journal_commits(rc.service) - commits0
                agents_used = [tree_cpu(p.pid) - b for p, b in zip(procs, agents, strict=True)]
                job = core.jobs[f"{WORKITEM}/{JOB}"]
                failed = [t for t in job.tasks.values() if t.exit_code != 0]
                if failed:
                    shown = "; ".join(f"exit {t.exit_code} {t.failure}" for t in failed[:3])
                    raise RuntimeError(f"{len(failed)} tasks failed: {shown}")
            finally:
                stop_agents(procs)
    return Run(
        n / (done - times["first"]),
        _cpu_table(n, me_used.own, agents_used, times["cpu"]),
        frames,
        commits,
    )


async def _wait_rest(client: AsyncClient, n: int, timeout: float = 600.0) -> float:
    """Poll task counts over REST until `n` are completed; returns the time they were seen. The poll
    interval follows the expected time left (each poll costs the coordinator a scan of the job),
    between 5 and 100 ms."""
    t0 = time.monotonic()
    first = time.monotonic()
    seen = 0
    while True:
        counts = await client.jobs.task_counts(WORKITEM, JOB)
        if counts.completed >= n:
            done = time.time()
            if counts.failed:
                raise RuntimeError(f"{counts.failed} tasks failed: {await _failures(client)}")
            return done
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{counts.completed} of {n} tasks completed after {timeout:.0f} s")
        if counts.completed and not seen:
            first = time.monotonic()
        seen = counts.completed
        rate = seen / max(1e-3, time.monotonic() - first) if seen else 0.0
        left = (n - seen) / rate if rate else 0.1
        await trio.sleep(min(0.1, max(0.005, left / 2)))


async def _failures(client: AsyncClient, show: int = 3) -> str:
    failed = [
        t
        for t in await client.tasks.list(WORKITEM, JOB, state="completed")
        if t.execution_info is None or t.execution_info.exit_code != 0
    ]
    return "; ".join(f"{t.name}: {t.execution_info}" for t in failed[:show])


async def run_up(n: int) -> Run:
    tmp = tempfile.mkdtemp(prefix="tvm-bench-up-")
    daemon = UpDaemon(tmp, agents=AGENTS)
    try:
        await trio.to_thread.run_sync(daemon.start)
        async with AsyncClient(daemon.endpoint, daemon.account, daemon.key, timeout=300) as client:
            await ready_pool(client, SLOTS, AGENTS)
            pids = daemon.agent_pids()
            if len(pids) != AGENTS:
                raise RuntimeError(f"tvm up runs {len(pids)} agents, expected {AGENTS}")
            count0 = await trio.to_thread.run_sync(scraped_counters, daemon.endpoint)
            me, coord, agents = self_cpu(), proc_times(daemon.pid)[0], [tree_cpu(p) for p in pids]
            sub = _submitter(daemon.endpoint, daemon.account, daemon.key, n)
            try:
                done = await _wait_rest(client, n)
                times = await _submitted(sub)
            finally:
                if sub.poll() is None:
                    sub.kill()
                    sub.wait()
            coord_used = proc_times(daemon.pid)[0] - coord
            count1 = await trio.to_thread.run_sync(scraped_counters, daemon.endpoint)
            agents_used = [tree_cpu(p) - b for p, b in zip(pids, agents, strict=True)]
            me_used = self_cpu() - me
        cpu = _cpu_table(n, coord_used, agents_used, times["cpu"])
        cpu["rest_poller"] = per_task_ms(me_used.own, n)
        frames = (count1[0] - count0[0], count1[1] - count0[1])
        return Run(n / (done - times["first"]), cpu, frames, count1[2] - count0[2])
    except BaseException:
        say(f"end_to_end: tvm up log: {daemon.log_tail()}")
        raise
    finally:
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _options(p: argparse.ArgumentParser) -> None:
    task_run_options(p)
    p.add_argument(
        "--stock",
        action="store_true",
        help="inproc: agents that have made their share of task directories ahead (as long-lived "
        "agents do after a job like it); see the module's docstring",
    )
    p.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="peers measured in the same run: comma-separated hyperqueue,dask, or none",
    )


def launcher() -> str:
    """Which launcher the agents started from this environment use: the compiled one-step
    launcher ("clone3", built at install time where a compiler exists) or the wrapper chain."""
    try:
        from tvmagent.launch.spawn import fast_available
    except ImportError:
        return "chain"
    return "clone3" if fast_available() else "chain"


def main() -> None:
    a = args(__doc__ or "", _options)
    peers = () if a.peers == "none" else tuple(p for p in a.peers.split(",") if p)
    if any(p not in PEERS for p in peers):
        raise SystemExit(f"error: --peers takes {', '.join(PEERS)} or none, not {a.peers!r}")
    # The agents read it at start (child_env copies this process's environment).
    os.environ["TVM_AGENT_TASK_ISOLATION"] = a.task_isolation
    n = a.tasks or (200 if a.quick else 3000)
    concurrency = AGENTS * SLOTS
    raw_before = raw_spawn_rate(n, concurrency)
    if a.stock and a.coordinator != "inproc":
        raise SystemExit("error: --stock is for --coordinator inproc")
    run = trio.run(run_inproc, n, a.stock) if a.coordinator == "inproc" else trio.run(run_up, n)
    others: dict[str, PeerResult] = peer_results(n, peers)
    raw_after = raw_spawn_rate(n, concurrency)
    # Measured on both sides of the runs: drift shows up in the spread.
    raw = (raw_before + raw_after) / 2
    params = {
        "tasks": n,
        "agents": AGENTS,
        "slots_per_agent": SLOTS,
        "command": "/bin/true",
        "task_isolation": a.task_isolation,
        "coordinator": a.coordinator,
        "launcher": launcher(),
    }
    if a.stock:
        params["stock"] = True
    emit("end_to_end", params, run.rate, "tasks/s")
    emit(
        "raw_spawn",
        {"spawns": n, "concurrency": concurrency, "command": "/bin/true"},
        raw,
        "tasks/s",
    )
    emit("end_to_end_ratio", params, run.rate / raw, "ratio")
    for kind, ms in run.cpu_ms.items():
        emit(f"end_to_end_cpu_per_task_{kind}", params, ms, "ms")
    if run.frames is not None:
        emit("end_to_end_frames_per_task", params, sum(run.frames) / n, "ratio")
    if run.commits is not None:
        emit("end_to_end_commits_per_task", params, run.commits / n, "ratio")
    versus = []
    for name, r in others.items():
        if r.rate is not None:
            emit(f"end_to_end_vs_{name}", params, run.rate / r.rate, "ratio")
            versus.append(f"{run.rate / r.rate:.2f}x {name}")
    say(
        f"end_to_end ({a.coordinator}): {n} tasks of /bin/true on {AGENTS} agents x {SLOTS} slots, "
        f"task isolation {a.task_isolation}, launcher {params['launcher']}: {run.rate:,.0f} tasks/s; "
        f"raw spawn {raw:,.0f}/s "
        f"(before {raw_before:,.0f}, after {raw_after:,.0f}); ratio {run.rate / raw:.2f}"
        + (f"; {', '.join(versus)}" if versus else "")
    )
    say(
        "end_to_end: CPU per task: "
        + ", ".join(f"{k} {v * 1000:.0f} µs" for k, v in run.cpu_ms.items())
    )
    if run.frames is not None:
        say(
            f"end_to_end: agent link frames in/out {run.frames[0]:,}/{run.frames[1]:,} "
            f"({sum(run.frames) / n:.2f} per task)"
            + (
                f"; store commits {run.commits:,} ({run.commits / n:.2f} per task)"
                if run.commits is not None
                else ""
            )
        )
    report(others, n, raw)


if __name__ == "__main__":
    main()
