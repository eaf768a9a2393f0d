"""Test harness: a real coordinator (in this process, real sockets and SQLite) and real agent
processes (`python -m tvmagent`), each with its own TVM root. Stopped by PID at the end."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from benchmarks import _procs
from benchmarks._procs import REPO as REPO  # re-exported: tests import them from here
from benchmarks._procs import AgentProcess, child_env, start_agent, stop_agents, stop_processes
from benchmarks._procs import close_pipes as close_pipes
from benchmarks._procs import remove_agent_cgroups as remove_agent_cgroups
from coordinator.client import AsyncClient, Client
from coordinator.daemon.server import RunningCoordinator, run_coordinator


def agent_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Test tasks run sys.executable, which lives under /root (pyenv) where unprivileged task users
    # cannot go: isolation tests (tests/system/test_isolation_*.py) turn it back on.
    return child_env(extra, task_isolation=False)


AgentProc = AgentProcess  # the name the tests know it by

_SYNC_CLIENTS: list[Client] = []


def sync_client(*args: Any, **kw: Any) -> Client:
    """A `Client` closed when the test ends (tests/conftest.py): one left open keeps its
    connection until the garbage collector finds it, in whatever test runs then."""
    client = Client(*args, **kw)
    _SYNC_CLIENTS.append(client)
    return client


def close_sync_clients() -> None:
    while _SYNC_CLIENTS:
        _SYNC_CLIENTS.pop().close()


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
        log = os.path.join(self.base, "agents", f"{name}.log")
        env = {"TVM_AGENT_TOKEN": token if token is not None else self.rc.join_token}
        if "--config" not in (extra_args or []):
            # A short drain: at teardown SIGTERM kills task trees at once, so a failed test leaves
            # no task processes behind (tasks run in their own sessions, outside the agent's group).
            env["TVM_AGENT_DRAIN_GRACE"] = "2"
        args = ["--log-level", "info", *(extra_args or [])]
        a = start_agent(self.rc.agent_url, name, root, log, agent_env(env), args=args)
        self.agents.append(a)
        return a

    def stop_agents(self) -> None:
        stop_agents(self.agents)

    async def wait_for(
        self, cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition"
    ) -> Any:
        """Poll `cond` (sync or async) until truthy; fail with `what` and agent logs."""

        def logs() -> str:
            return "\n".join(f"--- {a.name}\n{a.log_text()[-3000:]}" for a in self.agents)

        return await _procs.wait_for(cond, timeout, what, detail=logs)

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
    return _procs.start_coordinator(state, port, log, extra)


def stop_process_groups(procs: list[Any], grace: float = 15.0) -> None:
    """SIGTERM each (own-session) process group still running (SIGCONT first: one may be
    stopped), then SIGKILL whoever is not gone within `grace` seconds."""
    stop_processes([p for p in procs if p is not None], grace)


def wait_sync(
    cond: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "condition",
    *,
    tolerate_errors: bool = False,
) -> Any:
    """Blocking poll for tests that drive separate processes with the sync client."""
    return _procs.wait_sync(cond, timeout, what, tolerate_errors=tolerate_errors)
