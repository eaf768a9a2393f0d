"""Latency on an idle pool (2 agents x 2 slots): single tasks of `/bin/true` added one at a time
through the REST API, each waited for before the next.

- submit→start: client clock just before the POST to the task's start time on its record (the
  agent's report of the process start; same host, same clock).
- submit→complete: client clock just before the POST to the moment the client sees the task
  completed over REST: the round trip a user of the API gets. By default the client asks once with
  `?waitForCompletion=` (answered when the task completes); `--poll` GETs the task every 0.5 ms
  instead, starting after most of the recent latency has passed (so that its GETs do not load the
  coordinator while the task runs; a task already completed at the first GET errs high).

With `--coordinator up` a default `tvm up` runs as a subprocess and everything goes over signed REST
to it; `inproc` (default) hosts the coordinator in this process (and its client with it). CPU per
task: the coordinator (the daemon in `up`; this process, client included, in `inproc`; the client's
polls cost it too) and the agents' own time.

    python -m benchmarks.latency [--quick] [--tasks 1000] [--task-isolation users|none]
                                 [--coordinator inproc|up]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import trio

from coordinator.client import AsyncClient

from ._common import (
    args,
    coordinator,
    emit,
    local_pool,
    percentile,
    say,
    stop_agents,
    task_run_options,
)
from ._cpu import per_task_ms, proc_times, self_cpu, tree_cpu
from ._daemon import JOB, WORKITEM, UpDaemon, ready_pool
from .end_to_end import launcher

AGENTS = 2
SLOTS = 2
WARMUP = 5  # the first tasks warm up connections and caches


@dataclass
class Service:
    client: AsyncClient
    coordinator_pid: int | None  # None: this process
    agent_pids: list[int]


@asynccontextmanager
async def _inproc() -> AsyncIterator[Service]:
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        async with coordinator(os.path.join(tmp, "state"), heartbeat_timeout=30.0) as rc:
            procs = await local_pool(rc, tmp, agents=AGENTS, slots=SLOTS, size="medium")
            try:
                async with AsyncClient(rc.endpoint, rc.account, rc.key) as client:
                    yield Service(client, None, [p.pid for p in procs])
            finally:
                stop_agents(procs)


@asynccontextmanager
async def _up() -> AsyncIterator[Service]:
    tmp = tempfile.mkdtemp(prefix="tvm-bench-up-")
    daemon = UpDaemon(tmp, agents=AGENTS)
    try:
        await trio.to_thread.run_sync(daemon.start)
        async with AsyncClient(daemon.endpoint, daemon.account, daemon.key) as client:
            await ready_pool(client, SLOTS, AGENTS)
            yield Service(client, daemon.pid, daemon.agent_pids())
    finally:
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _unix(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def run(
    n: int, mode: str, wait_api: bool = True
) -> tuple[list[float], list[float], dict[str, float], dict[str, float]]:
    """Per task, submit→start and submit→complete (ms); CPU per task of the coordinator and
    the agents (ms); p50 of the round trip's pieces (ms): the POST's answer, the task's start→end
    (agent clock), end→seen by the client."""
    starts: list[float] = []
    completes: list[float] = []
    parts: dict[str, list[float]] = {}  # where the round trip goes: p50 of each piece
    async with _inproc() if mode == "inproc" else _up() as svc:
        client = svc.client
        cpu0: tuple[float, list[float]] = (0.0, [])
        delay = 0.0
        for i in range(n + WARMUP):
            if i == WARMUP:
                cpu0 = (_coordinator_cpu(svc), [tree_cpu(p).own for p in svc.agent_pids])
            name = f"t{i:05d}"
            t0 = time.time()
            await client.tasks.add(WORKITEM, JOB, name, "/bin/true")
            posted = time.time()
            if wait_api:
                # One GET that the coordinator answers when the task completes.
                task = await client.tasks.get(WORKITEM, JOB, name, wait_for_completion=30)
                if task.state != "completed":
                    raise RuntimeError(f"task {name} did not complete within 30 s")
            else:
                await trio.sleep(max(0.0, t0 + delay - time.time()))
                polls = 0
                while True:
                    task = await client.tasks.get(WORKITEM, JOB, name)
                    polls += 1
                    if task.state == "completed":
                        break
                    await trio.sleep(0.0005)
            done = time.time()
            if not wait_api:
                # The first GET waits for most of the usual latency (every GET costs the
                # coordinator CPU the task needs): 70 % of recent latencies, halved whenever the
                # first GET already finds the task completed (that sample bounds it from above).
                delay = delay / 2 if polls == 1 else 0.9 * delay + 0.1 * 0.7 * (done - t0)
            info = task.execution_info
            if info is None or info.exit_code != 0 or info.start_time is None:
                raise RuntimeError(f"task {name} failed: {info}")
            if i >= WARMUP:
                start, end = _unix(info.start_time), _unix(info.end_time or info.start_time)
                starts.append((start - t0) * 1000)
                completes.append((done - t0) * 1000)
                for part, ms in (
                    ("post", posted - t0),
                    ("start_to_end", end - start),
                    ("end_to_seen", done - end),
                ):
                    parts.setdefault(part, []).append(ms * 1000)
        agents = sum(tree_cpu(p).own for p in svc.agent_pids) - sum(cpu0[1])
        cpu = {
            "coordinator": per_task_ms(_coordinator_cpu(svc) - cpu0[0], n),
            "agents": per_task_ms(agents, n),
        }
    pieces = {k: percentile(v, 50) for k, v in parts.items()}
    return starts, completes, cpu, pieces


_LABELS = {"post": "POST answered", "start_to_end": "start→end", "end_to_seen": "end→seen"}


def _coordinator_cpu(svc: Service) -> float:
    return self_cpu().own if svc.coordinator_pid is None else proc_times(svc.coordinator_pid)[0]


def _options(p: argparse.ArgumentParser) -> None:
    task_run_options(p)
    p.add_argument(
        "--poll",
        action="store_true",
        help="see completion by polling GETs instead of one ?waitForCompletion= GET",
    )


def main() -> None:
    a = args(__doc__ or "", _options)
    os.environ["TVM_AGENT_TASK_ISOLATION"] = a.task_isolation  # read by the agents at start
    n = a.tasks or (50 if a.quick else 1000)
    starts, completes, cpu, pieces = trio.run(run, n, a.coordinator, not a.poll)
    params = {
        "tasks": n,
        "agents": AGENTS,
        "slots_per_agent": SLOTS,
        "command": "/bin/true",
        "task_isolation": a.task_isolation,
        "coordinator": a.coordinator,
        "complete_seen": "client over REST, " + ("polling" if a.poll else "waitForCompletion"),
        "launcher": launcher(),
    }
    for label, values in (("submit_to_start", starts), ("submit_to_complete", completes)):
        for q in (50, 99):
            emit(f"latency_{label}_p{q}", params, percentile(values, q), "ms")
    for kind, ms in cpu.items():
        emit(f"latency_cpu_per_task_{kind}", params, ms, "ms")
    for piece, ms in pieces.items():
        emit(f"latency_{piece}_p50", params, ms, "ms")
    say(
        f"latency over {n} single tasks ({a.coordinator}, task isolation {a.task_isolation}): "
        f"submit→start p50 {percentile(starts, 50):.2f} ms, p99 {percentile(starts, 99):.2f} ms; "
        f"submit→complete seen over REST p50 {percentile(completes, 50):.2f} ms, "
        f"p99 {percentile(completes, 99):.2f} ms; CPU per task: "
        + ", ".join(f"{k} {v * 1000:.0f} µs" for k, v in cpu.items())
        + "; p50 of the pieces: "
        + ", ".join(f"{_LABELS[k]} {v:.2f} ms" for k, v in pieces.items())
    )


if __name__ == "__main__":
    main()
