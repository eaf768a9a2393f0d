"""Shared pieces of the benchmarks: result lines, machine facts, an in-process coordinator.

Every benchmark prints one JSON object per result line on stdout —
`{"name", "parameters", "value", "unit"}` with unit in tasks/s | ms | bytes | s | ratio — and a
short human summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from benchmarks import _procs

REPO = _procs.REPO
UNITS = ("tasks/s", "ms", "bytes", "s", "ratio")


def emit(name: str, parameters: dict[str, Any], value: float, unit: str) -> dict[str, Any]:
    if unit not in UNITS:
        raise ValueError(f"unit {unit!r} is not one of {UNITS}")
    if STORE[0] != "sqlite":
        parameters = {**parameters, "store": STORE[0]}
    row = {"name": name, "parameters": parameters, "value": round(float(value), 4), "unit": unit}
    print(json.dumps(row), flush=True)
    return row


def link_frames(svc: Any) -> tuple[int, int]:
    """Websocket frames (in, out) over every agent link so far."""
    frames: tuple[int, int] = svc.agent_frames()
    return frames


def journal_commits(svc: Any) -> int:
    """The coordinator's store transactions so far."""
    commits: int = svc.journal.commits
    return commits


def scraped_counters(endpoint: str) -> tuple[int, int, int]:
    """Frames in, out (as `link_frames`) and journal commits, read from a coordinator's `/metrics`
    (no key needed)."""
    with urllib.request.urlopen(f"{endpoint.rstrip('/')}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = dict(re.findall(r'^tvm_agent_frames_total\{direction="(in|out)"\} (\d+)$', text, re.M))
    commits = re.search(r"^tvm_journal_commits_total (\d+)$", text, re.M)
    return int(found.get("in", 0)), int(found.get("out", 0)), int(commits[1]) if commits else 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in well under 20 s")
    p.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the in-process coordinator's store: SQLite in its state dir, or a private PostgreSQL "
        "server started for the run (Debian postgresql; its CPU is not in the coordinator's)",
    )
    if extra:
        extra(p)
    ns = p.parse_args()
    STORE[0] = ns.store
    return ns


STORE = ["sqlite"]  # set from --store by `args`; read by `coordinator`


def task_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that run tasks on real agents (end_to_end, latency)."""
    p.add_argument("--tasks", type=int, default=0)
    p.add_argument(
        "--task-isolation",
        choices=("users", "none"),
        default="users",
        help="how the (root) agents run tasks: each as its own Linux user, or as root",
    )
    p.add_argument(
        "--coordinator",
        choices=("inproc", "up"),
        default="inproc",
        help="the coordinator in this process, or a default `tvm up` driven over REST",
    )


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return _procs.child_env(extra)


def spawn(
    module: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = None,
) -> subprocess.Popen[bytes]:
    """A helper process (`python -m benchmarks.<module>`), in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=child_env(env),
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def raw_spawn_rate(n: int, concurrency: int, argv: tuple[str, ...] = ("/bin/true",)) -> float:
    """Spawns per second of `argv` with `concurrency` threads each spawning and waiting: the
    machine's ceiling for running `n` trivial tasks, with no scheduler in between."""
    left = [n]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            subprocess.run(list(argv), check=True)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n / (time.perf_counter() - t0)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size from /proc (VmRSS)."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@asynccontextmanager
async def coordinator(state_dir: str, **kw: Any):  # noqa: ANN201 - async generator
    """A real coordinator (REST + agent websocket, SQLite journal or --store postgres) in this
    process."""
    from coordinator.daemon.server import run_coordinator

    if STORE[0] == "postgres" and "store" not in kw:
        from tests.pgcluster import PgCluster

        cluster = await trio.to_thread.run_sync(PgCluster)
        try:
            url = await trio.to_thread.run_sync(cluster.new_database)
            async with coordinator(state_dir, store=url, **kw) as rc:
                yield rc
        finally:
            await trio.to_thread.run_sync(cluster.close)
        return
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def _run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await run_coordinator(state_dir, task_status=task_status, **kw)

        rc = await nursery.start(_run)
        try:
            yield rc
        finally:
            scope.cancel()


async def wait_until(
    cond: Callable[[], bool], limit: float, what: str, poll: float = 0.005
) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit:.0f} s waiting for {what}")
        await trio.sleep(poll)


def pool_ready(core: Any, pool: str, n: int) -> bool:
    return (
        sum(
            1
            for t in core.tvms.values()
            if t.rec.pool == pool and t.rec.state in ("idle", "running") and t.ready
        )
        >= n
    )


def job_finished(core: Any, key: str, total: int) -> bool:
    """Every one of `total` tasks of job `key` completed (cheap checks first: called often)."""
    job = core.jobs.get(key)
    if job is None or len(job.tasks) < total:
        return False
    if any(t.rec.pool == job.rec.pool and t.running for t in core.tvms.values()):
        return False
    if any(t.state == "active" for t in job.queue):
        return False
    c = core.task_counts(job)
    return c.completed >= total


def start_agents(
    rc: Any, n: int, base: str, log_level: str = "warning"
) -> list[subprocess.Popen[bytes]]:
    """Real agent processes (`python -m tvmagent`), each with its own TVM root under `base`."""
    procs = []
    # Task users must be able to pass through every directory above a TVM root (o+x), as on a
    # real host; a private temp dir would make every task fail to enter its directory.
    # Only the benchmark's own directories below the temp dir are opened up.
    os.makedirs(base, exist_ok=True)
    top = os.path.realpath(tempfile.gettempdir())
    d = os.path.realpath(base)
    while d.startswith(top + os.sep):
        if not os.stat(d).st_mode & 0o001:
            os.chmod(d, os.stat(d).st_mode | 0o011)
        d = os.path.dirname(d)
    env = child_env({"TVM_AGENT_TOKEN": rc.join_token})
    for i in range(n):
        root, log = os.path.join(base, f"agent{i}"), os.path.join(base, f"agent{i}.log")
        args = ["--log-level", log_level]
        agent = _procs.start_agent(rc.agent_url, f"bench-agent{i}", root, log, env, args=args)
        procs.append(agent.proc)
    return procs


def stop_agents(procs: list[subprocess.Popen[bytes]]) -> None:
    _procs.stop_processes(procs)


async def local_pool(
    rc: Any,
    base: str,
    agents: int,
    slots: int,
    size: str,
    pool: str = "bench",
    workitem: str = "wi",
) -> list[subprocess.Popen[bytes]]:
    """Start `agents` real agents, a pool using all of them and a workitem on it."""
    from coordinator.common import models as m

    svc, core = rc.service, rc.service.core
    procs = start_agents(rc, agents, os.path.join(base, "agents"))
    try:
        await wait_until(
            lambda: sum(1 for a in core.agents.values() if a.connected) >= agents,
            60,
            f"{agents} agents",
        )
        await svc.execute(
            core.add_pool,
            m.PoolAdd(name=pool, vm_size=size, target_dedicated=agents, max_tasks_per_vm=slots),
        )
        await wait_until(lambda: pool_ready(core, pool, agents), 60, f"{agents} ready TVMs")
        await svc.execute(
            core.add_workitem,
            m.WorkitemAdd(
                name=workitem, job_execution_environment=m.JobExecutionEnvironment(pool_name=pool)
            ),
        )
    except TimeoutError as exc:
        stop_agents(procs)
        logs = [f"--- agent{i}\n{_agent_log_tail(base, i)}" for i in range(agents)]
        raise TimeoutError(f"{exc}\n" + "\n".join(logs)) from None
    except BaseException:
        stop_agents(procs)
        raise
    return procs


def agents_running(procs: list[subprocess.Popen[bytes]], base: str) -> bool:
    """True while every agent of `local_pool(rc, base, ...)` runs; a RuntimeError naming the first
    that ended, its exit status and its log's end otherwise (a benchmark waiting on its tasks
    would wait out its time limit)."""
    for i, proc in enumerate(procs):
        code = proc.poll()
        if code is not None:
            tail = _agent_log_tail(base, i).strip() or "(empty)"
            raise RuntimeError(f"agent{i} ended (exit status {code}); its log ends:\n{tail}")
    return True


def _agent_log_tail(base: str, i: int) -> str:
    """The end of agent `i`'s log, as `local_pool(rc, base, ...)` started it."""
    return _tail(os.path.join(base, "agents", f"agent{i}.log"))


def _tail(path: str, size: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-size:]
    except OSError as exc:
        return str(exc)
