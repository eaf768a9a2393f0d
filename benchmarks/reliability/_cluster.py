"""What the reliability suites share: a coordinator as its own process (killed and restarted on
the same state) or in this process, agent processes (optionally inside a network namespace), tasks
that record every real execution in a run log, and the tally of an outcome (lost, duplicated, run
again without a requeue)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from benchmarks import _procs
from benchmarks._procs import AgentProcess
from benchmarks._procs import remove_agent_cgroups as remove_agent_cgroups  # the suites' names
from benchmarks._procs import stop_agents as stop_agents
from benchmarks._procs import wait_for as wait_for
from benchmarks._procs import wait_sync as wait_sync


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Recorded tasks append to a run log beside the test's files, which task users could not
    # reach; isolation is not what these suites test.
    return _procs.child_env(extra, task_isolation=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RunLog:
    """Every task of a suite appends `<task> <tvm>` to one file when it really starts and
    `<task> <tvm> end` when its work is done (appends of a short line are atomic), so real
    executions are counted, not what the coordinator believes."""

    def __init__(self, path: str) -> None:
        self.path = path
        open(path, "a").close()  # noqa: SIM115

    def command(self, seconds: float = 0.0) -> str:
        line = '"$WATASK_TASK_NAME $WATASK_TVM_NAME'
        script = f'echo {line}" >> {shlex.quote(self.path)}'
        if seconds > 0:
            script += f"; sleep {seconds}"
        script += f'; echo {line} end" >> {shlex.quote(self.path)}'
        return "/bin/sh -c " + shlex.quote(script)

    def _lines(self) -> list[list[str]]:
        with open(self.path) as f:
            return [line.split() for line in f]

    def runs(self) -> list[tuple[str, str]]:
        """(task, tvm) of every execution started."""
        return [(p[0], p[1]) for p in self._lines() if len(p) == 2]

    def ends(self) -> list[tuple[str, str]]:
        """(task, tvm) of every execution that ran to its end."""
        return [(p[0], p[1]) for p in self._lines() if len(p) == 3 and p[2] == "end"]

    def counts(self) -> Counter[str]:
        return Counter(name for name, _ in self.runs())


# --------------------------------------------------------------------------- coordinator process


@dataclass
class CoordinatorProcess:
    """`tvm coordinator` as its own process on a fixed port, so it comes back where agents look."""

    state: str
    logdir: str
    args: Sequence[str] = ()
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    exports: dict[str, str] = field(default_factory=dict)
    starts: int = 0

    def start(self) -> dict[str, str]:
        if not self.port:
            self.port = free_port(self.host)
        self.starts += 1
        log = os.path.join(self.logdir, f"coordinator{self.starts}.log")
        args = ["--host", self.host, *self.args]
        self.proc, self.exports = _procs.start_coordinator(self.state, self.port, log, args)
        return self.exports

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: nothing of it runs after this (no flush, no goodbye to the agents)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None:
            _procs.close_pipes(self.proc)

    @property
    def wal(self) -> str:
        return os.path.join(self.state, "coordinator.db-wal")


# --------------------------------------------------------------------------- agents


Agent = AgentProcess


def start_agent(url: str, token: str, base: str, name: str, prefix: Sequence[str] = ()) -> Agent:
    """`python -m tvmagent` in its own session (`prefix`: e.g. `ip netns exec NS`)."""
    root = os.path.join(base, "agents", name)
    log = os.path.join(base, "agents", f"{name}.log")
    # A short drain: SIGTERM at the end stops task trees at once.
    env = child_env({"TVM_AGENT_TOKEN": token, "TVM_AGENT_DRAIN_GRACE": "2"})
    return _procs.start_agent(url, name, root, log, env, prefix=prefix)


# --------------------------------------------------------------------------- in-process coordinator


@contextlib.asynccontextmanager
async def inproc_coordinator(state: str, **kw: Any) -> AsyncIterator[Any]:
    """`run_coordinator` in this trio run; yields its RunningCoordinator (service reachable)."""
    from coordinator.daemon.server import run_coordinator

    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def _run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await run_coordinator(state, task_status=task_status, **kw)

        rc = await nursery.start(_run)
        try:
            yield rc
        finally:
            scope.cancel()


# --------------------------------------------------------------------------- the outcome


def tally(acked: set[str], tasks: Sequence[Any], runs: Counter[str]) -> dict[str, Any]:
    """The figures every suite reports from the final task list and the run log.

    lost: acknowledged but absent or not completed; failed: completed with a failure;
    never_ran: completed without any real execution; reruns: executions beyond the first;
    unexplained_reruns: executions beyond 1 + requeues + retries (a task run twice that nobody
    requeued); requeues: the tasks' requeue counts; stray: executions of unknown tasks."""
    final = {t.name: t for t in tasks}
    lost = sum(1 for n in acked if n not in final or final[n].state != "completed")
    failed = never_ran = unexplained = requeues = 0
    for name, t in final.items():
        info = t.execution_info
        rq = info.requeue_count if info else 0
        rt = info.retry_count if info else 0
        requeues += rq
        if t.state == "completed":
            if info is None or info.exit_code != 0:
                failed += 1
            if runs[name] == 0:
                never_ran += 1
        unexplained += max(0, runs[name] - 1 - rq - rt)
    return {
        "acknowledged": len(acked),
        "lost": lost,
        "failed": failed,
        "never_ran": never_ran,
        "reruns": sum(max(0, c - 1) for c in runs.values()),
        "unexplained_reruns": unexplained,
        "requeues": requeues,
        "stray": sum(c for n, c in runs.items() if n not in final),
    }


def changed_completions(before: dict[str, tuple[Any, ...]], tasks: Sequence[Any]) -> int:
    """Completions seen earlier that were recorded again since (another TVM or end time): a
    completion recorded twice."""
    final = {t.name: t for t in tasks}
    return sum(1 for n, seen in before.items() if n in final and completion_of(final[n]) != seen)


def completion_of(t: Any) -> tuple[Any, ...]:
    info = t.execution_info
    return (
        t.tvm_info.tvm_name if t.tvm_info else None,
        info.end_time if info else None,
        info.exit_code if info else None,
    )
