"""Agent and coordinator processes for the benchmarks and the tests (tests/harness.py imports this,
never the other way: the benchmarks run without the test tree): their environment, their start in
a session of their own, their stop, the cgroups an agent killed outright leaves behind, and the
polls that wait for what they do."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from signal import SIGCONT, SIGKILL, SIGTERM
from typing import Any

import trio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(
    extra: dict[str, str] | None = None, *, task_isolation: bool = True
) -> dict[str, str]:
    """This process's environment with the repository importable, then `extra`.

    task_isolation=False: tasks run as the agent's user unless the environment already says
    otherwise, for tasks that use files (the interpreter, a run log) task users could not reach."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if not task_isolation:
        env.setdefault("TVM_AGENT_TASK_ISOLATION", "none")
    env.update(extra or {})
    return env


@dataclass
class AgentProcess:
    name: str
    root: str
    proc: subprocess.Popen[bytes]
    log: str

    def signal(self, sig: int) -> None:
        """To its process group, while it runs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self, sig: int = SIGKILL) -> None:
        self.signal(sig)

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def start_agent(
    url: str,
    name: str,
    root: str,
    log: str,
    env: dict[str, str],
    *,
    args: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> AgentProcess:
    """`python -m tvmagent` for TVM `name` on `root`, in its own session, its output appended to
    `log`. `env` is its whole environment, the join token in it (never on the command line: ps
    shows that); `prefix`: e.g. `ip netns exec NS`."""
    os.makedirs(root, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115
    try:
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
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=env,
        )
    finally:
        out.close()
    return AgentProcess(name, root, proc, log)


def start_coordinator(
    state: str, port: int, log: str, args: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`tvm coordinator` on `state` and `port` as its own process in its own session, its stderr
    appended to `log`; returns it, once it serves, with the four export lines it printed."""
    out = open(log, "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator",
                "coordinator",
                "--state-dir",
                state,
                "--port",
                str(port),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=child_env(task_isolation=False),
            start_new_session=True,
        )
    finally:
        out.close()
    exports: dict[str, str] = {}
    assert proc.stdout is not None
    while len(exports) < 4:
        line = proc.stdout.readline().decode()
        if not line:
            with open(log, errors="replace") as f:
                raise RuntimeError(f"coordinator exited early:\n{f.read()[-4000:]}")
        k, _, v = line.strip().removeprefix("export ").partition("=")
        exports[k] = v
    return proc, exports


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM each process group still running (SIGCONT first: a stopped one cannot act on it),
    then SIGKILL whichever is not gone within `grace` seconds of that."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, SIGCONT)
            os.killpg(p.pid, SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, SIGKILL)
            p.wait()
    for p in procs:
        close_pipes(p)


def close_pipes(proc: subprocess.Popen[bytes]) -> None:
    """An ended process's pipes (a coordinator's export lines), not left to the garbage collector."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def stop_agents(agents: Sequence[AgentProcess], grace: float = 10.0) -> None:
    stop_processes([a.proc for a in agents], grace)
    for a in agents:
        remove_agent_cgroups(a.name, a.root)


def remove_agent_cgroups(agent_id: str, root: str, wait: float = 5.0) -> None:
    """What an agent killed outright kept for a restart on its root, which never comes (a live
    agent removes its own at exit): its task cgroups and its pool group. A task still running in
    a cgroup (a job manager) is killed; its cgroup can go only once the kernel has seen it exit,
    so removal is retried for up to `wait` seconds."""
    from tvmagent import _cgroups, leftovers
    from tvmagent.agent import cgroup_prefix
    from tvmagent.pool_isolation import drop_noted_pool_group

    drop_noted_pool_group(root)
    prefix = _cgroups.sanitize_name(cgroup_prefix(agent_id, root))
    layout = _cgroups.detect_layout([])
    gone = leftovers.remove_task_cgroups([os.path.join(b, prefix) for b in layout.bases()], wait)
    if gone:  # nothing of it is left: its host-wide record goes too
        with contextlib.suppress(OSError):
            leftovers.forget(root)


async def wait_for(
    cond: Callable[[], Any],
    timeout: float = 60.0,
    what: str = "condition",
    poll: float = 0.05,
    *,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll `cond` (sync or async) until truthy; a timeout's error adds `detail()` (agent logs)."""
    deadline = trio.current_time() + timeout
    while True:
        value = cond()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if trio.current_time() > deadline:
            more = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{more}")
        await trio.sleep(poll)


def wait_sync(
    cond: Callable[[], Any],
    timeout: float = 60.0,
    what: str = "condition",
    poll: float = 0.05,
    *,
    tolerate_errors: bool = True,
) -> Any:
    """Blocking poll; with `tolerate_errors`, an exception (a coordinator restarting) counts as
    not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:  # noqa: BLE001
            if not tolerate_errors:
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
