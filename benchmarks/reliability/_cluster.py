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
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # Recorded tasks append to a run log beside the test's files, which task users could not
    # reach; isolation is not what these suites test.
    env.setdefault("TVM_AGENT_TASK_ISOLATION", "none")
    env.update(extra or {})
    return env


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
        out = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator",
                "coordinator",
                "--state-dir",
                self.state,
                "--host",
                self.host,
                "--port",
                str(self.port),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            start_new_session=True,
        )
        out.close()
        exports: dict[str, str] = {}
        assert self.proc.stdout is not None
        while len(exports) < 4:
            line = self.proc.stdout.readline().decode()
            if not line:
                with open(log, errors="replace") as f:
                    raise RuntimeError(f"coordinator exited early:\n{f.read()[-4000:]}")
            k, _, v = line.strip().removeprefix("export ").partition("=")
            exports[k] = v
        self.exports = exports
        return exports

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: nothing of it runs after this (no flush, no goodbye to the agents)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def wal(self) -> str:
        return os.path.join(self.state, "coordinator.db-wal")


# --------------------------------------------------------------------------- agents


@dataclass
class Agent:
    name: str
    root: str
    proc: subprocess.Popen[bytes]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)


def start_agent(url: str, token: str, base: str, name: str, prefix: Sequence[str] = ()) -> Agent:
    """`python -m tvmagent` in its own session (`prefix`: e.g. `ip netns exec NS`)."""
    root = os.path.join(base, "agents", name)
    os.makedirs(root, exist_ok=True)
    out = open(os.path.join(base, "agents", f"{name}.log"), "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "tvmagent",
            "--coordinator",
            url,
            "--root",
            root,
            "--name",
            name,
        ],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        start_new_session=True,
        # A short drain: SIGTERM at the end stops task trees at once.
        env=child_env({"TVM_AGENT_TOKEN": token, "TVM_AGENT_DRAIN_GRACE": "2"}),
    )
    out.close()
    return Agent(name, root, proc)


def stop_agents(agents: Sequence[Agent]) -> None:
    for a in agents:
        a.signal(signal.SIGCONT)  # a stopped one cannot act on SIGTERM
        a.signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for a in agents:
        try:
            a.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.signal(signal.SIGKILL)
            a.proc.wait()
    for a in agents:
        remove_agent_cgroups(a.name, a.root)


def remove_agent_cgroups(agent_id: str, root: str) -> None:
    """The task cgroups a SIGKILLed agent kept for a restart on its root, which never comes."""
    from tvmagent import _cgroups
    from tvmagent.agent import cgroup_prefix

    layout = _cgroups.detect_layout([])
    prefix = cgroup_prefix(agent_id, root)
    for d in _cgroups.stale_task_dirs(layout, prefix):
        _cgroups.kill_and_remove(d)
    for base in (layout.v2_base, *layout.v1_bases.values()):
        if base:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(base, prefix))


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


async def wait_for(
    cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition", poll: float = 0.05
) -> Any:
    """Poll `cond` (sync or async) until truthy."""
    deadline = trio.current_time() + timeout
    while True:
        value = cond()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await trio.sleep(poll)


def wait_sync(
    cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition", poll: float = 0.05
) -> Any:
    """Blocking poll; errors (a coordinator restarting) count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:  # noqa: BLE001
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


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
