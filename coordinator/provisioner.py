"""Provisioners start and stop agents for pools (DESIGN.md §7). The embedded default is local:
agent processes on this machine, each with its own TVM root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Protocol


class Provisioner(Protocol):
    """What the coordinator needs from a provisioner. `start` must not block for long: it is called on
    the coordinator's event loop and only has to *launch* agents, which then register by themselves
    (`run_coordinator(provisioner=...)`)."""

    def start(self, n: int, size: str) -> list[str]: ...
    def stop(self, name: str) -> None: ...
    def stop_all(self) -> None: ...


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _primary_ip() -> str:
    from tvmagent.metrics import _primary_ip as primary

    return primary()


class LocalProvisioner:
    def __init__(self, state_dir: str, coordinator_url: str, token: str, *, log_level: str = "warning") -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.url = coordinator_url
        self.token = token
        self.log_level = log_level
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, n: int, size: str = "small") -> list[str]:
        started = []
        for _ in range(n):
            index = len(self.procs)
            root = os.path.join(self.state_dir, "agents", f"agent-{index}")
            os.makedirs(root, exist_ok=True)
            log = open(os.path.join(self.state_dir, "agents", f"agent-{index}.log"), "ab")  # noqa: SIM115
            env = dict(os.environ)
            env["TVM_AGENT_TOKEN"] = self.token  # never on the command line (ps shows it)
            env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
            # The address the pool's port gate listens on when nftables is missing (fail closed).
            env.setdefault("TVM_AGENT_IP", _primary_ip())
            if not _others_can_run(sys.executable):
                # Local sample tasks run this interpreter; unprivileged task users could not (issue 8).
                env.setdefault("TVM_AGENT_TASK_ISOLATION", "none")
            proc = subprocess.Popen(
                [sys.executable, "-m", "tvmagent", "--coordinator", self.url, "--root", root,
                 "--name", f"local-{index}", "--log-level", self.log_level],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
            )
            log.close()
            self.procs.append(proc)
            started.append(f"local-{index}")
        return started

    def stop(self, name: str, grace: float = 10.0) -> None:
        """Stop one agent started here (`local-<index>`)."""
        index = int(name.rpartition("-")[2])
        p = self.procs[index]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self, grace: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _others_can_run(path: str) -> bool:
    """True when an unprivileged user may execute `path` (every directory on the way searchable)."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & 0o001:
            return False
    return bool(os.stat(real).st_mode & 0o001)
