"""Test harness: a real coordinator (in this process, real sockets and SQLite) and real agent
processes (`python -m tvmagent`), each with its own TVM root. Stopped by PID at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from coordinator.client import AsyncClient
from coordinator.daemon.server import RunningCoordinator, run_coordinator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def agent_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # Test tasks run sys.executable, which lives under /root (pyenv) where unprivileged task users
    # cannot go: isolation tests (tests/system/test_isolation_*.py) turn it back on.
    env.setdefault("TVM_AGENT_TASK_ISOLATION", "none")
    env.update(extra or {})
    return env


def remove_agent_cgroups(agent_id: str, root: str) -> None:
    """What an agent killed mid-test kept of its task cgroups (a live agent removes its own at exit;
    one SIGKILLed leaves them for its restart on the same root, which a test never does)."""
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


@dataclass
class AgentProc:
    name: str
    root: str
    proc: subprocess.Popen[bytes]
    log: str

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


@dataclass
class Cluster:
    rc: RunningCoordinator
    base: str
    client: AsyncClient
    agents: list[AgentProc] = field(default_factory=list)

    def start_agent(
        self,
        name: str | None = None,
        *,
        extra_args: list[str] | None = None,
        token: str | None = None,
        root: str | None = None,
    ) -> AgentProc:
        name = name or f"agent{len(self.agents)}"
        root = root or os.path.join(self.base, "agents", name)
        os.makedirs(root, exist_ok=True)
        log = os.path.join(self.base, "agents", f"{name}.log")
        out = open(log, "ab")  # noqa: SIM115
        env = {"TVM_AGENT_TOKEN": token if token is not None else self.rc.join_token}
        if "--config" not in (extra_args or []):
            # A short drain: at teardown SIGTERM kills task trees at once, so a failed test leaves
            # no task processes behind (tasks run in their own sessions, outside the agent's group).
            env["TVM_AGENT_DRAIN_GRACE"] = "2"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tvmagent",
                "--coordinator",
                self.rc.agent_url,
                "--root",
                root,
                "--name",
                name,
                "--log-level",
                "info",
                *(extra_args or []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=agent_env(env),
        )
        out.close()
        a = AgentProc(name, root, proc, log)
        self.agents.append(a)
        return a

    def stop_agents(self) -> None:
        for a in self.agents:
            a.kill(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for a in self.agents:
            try:
                a.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                a.kill(signal.SIGKILL)
                a.proc.wait()
        for a in self.agents:
            remove_agent_cgroups(a.name, a.root)

    async def wait_for(
        self, cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition"
    ) -> Any:
        """Poll `cond` (sync or async) until truthy; fail with `what` and agent logs."""
        deadline = trio.current_time() + timeout
        while True:
            value = cond()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            if trio.current_time() > deadline:
                logs = "\n".join(f"--- {a.name}\n{a.log_text()[-3000:]}" for a in self.agents)
                raise AssertionError(f"timed out waiting for {what}\n{logs}")
            await trio.sleep(0.05)

    async def pool_with_tvms(self, name: str, n: int, **kw: Any) -> None:
        await self.client.pools.add(name, target_dedicated=n, **kw)
        await self.wait_for(lambda: self._idle(name, n), what=f"{n} idle TVMs in {name}")

    async def _idle(self, pool: str, n: int) -> bool:
        tvms = await self.client.tvms.list(pool)
        return sum(1 for t in tvms if t.state in ("idle", "running")) >= n


class cluster_ctx:
    """`async with cluster_ctx(nursery, tmp_path, agents=2) as c:` — coordinator + agent processes."""

    def __init__(self, nursery: trio.Nursery, tmp: Any, agents: int = 0, **coord_kw: Any) -> None:
        self.nursery = nursery
        self.base = str(tmp)
        self.n = agents
        self.kw = coord_kw
        self.cancel = trio.CancelScope()

    async def __aenter__(self) -> Cluster:
        kw = dict(self.kw)
        state = os.path.join(self.base, "state")

        async def _run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with self.cancel:
                await run_coordinator(state, task_status=task_status, **kw)

        rc = await self.nursery.start(_run)
        client = AsyncClient(rc.endpoint, rc.account, rc.key)
        self.cluster = Cluster(rc, self.base, client)
        for _ in range(self.n):
            self.cluster.start_agent()
        return self.cluster

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.cluster.stop_agents)
            await self.cluster.client.aclose()
        self.cancel.cancel()


# --------------------------------------------------------------------------- separate processes


def free_port() -> int:
    """A loopback port free right now (for a coordinator that must come back on the same port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_coordinator_process(
    state: str, port: int, log: str, *extra: str
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`tvm coordinator` as its own process; returns it and the export lines it printed."""
    out = open(log, "ab")  # noqa: SIM115
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
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=out,
        stdin=subprocess.DEVNULL,
        env=agent_env(),
        start_new_session=True,
    )
    out.close()
    exports: dict[str, str] = {}
    assert proc.stdout is not None
    while len(exports) < 4:
        line = proc.stdout.readline().decode()
        if not line:
            with open(log, errors="replace") as f:
                raise AssertionError(f"coordinator exited early:\n{f.read()}")
        k, _, v = line.strip().removeprefix("export ").partition("=")
        exports[k] = v
    return proc, exports


def stop_process_groups(procs: list[Any], grace: float = 15.0) -> None:
    """SIGTERM each (own-session) process group still running (SIGCONT first: one may be
    stopped), then SIGKILL whoever is not gone within `grace` seconds."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGCONT)
            os.killpg(p.pid, signal.SIGTERM)
    for p in live:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_sync(
    cond: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "condition",
    *,
    tolerate_errors: bool = False,
) -> Any:
    """Blocking poll for tests that drive separate processes with the sync client."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:  # noqa: BLE001 - e.g. the coordinator is restarting
            if not tolerate_errors:
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
