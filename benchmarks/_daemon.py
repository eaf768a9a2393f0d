"""A default `tvm up` (the real daemon: coordinator + SQLite + 2 local agents) as a subprocess with its
state directory in a temporary directory, driven over signed REST with coordinator.client.

`tvm up` prints `export TVM_ENDPOINT=…`, `TVM_ACCOUNT`, `TVM_KEY` on stdout once its endpoint takes
requests; its local agents are its direct children (`python -m tvmagent`). As root, their TVM roots
go to /var/lib/tvm-up/<digest of the state directory>: removed again on stop (only if this run
created it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import trio

from coordinator.runtime.provisioner import default_tvm_root_dir

from ._common import child_env
from ._cpu import children_map

POOL = "bench"
WORKITEM = "wi"
JOB = "job-0000000001"


class UpDaemon:
    def __init__(self, base: str, agents: int = 2) -> None:
        self.base = base
        self.agents = agents
        self.state_dir = os.path.join(base, "state")
        self.tvm_roots = default_tvm_root_dir(self.state_dir)
        self._roots_existed = os.path.exists(self.tvm_roots)
        self.out_path = os.path.join(base, "up.out")
        self.log_path = os.path.join(base, "up.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = self.account = self.key = ""
        self._agent_pids: list[int] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "coordinator",
                    "up",
                    "--state-dir",
                    self.state_dir,
                    "--port",
                    "0",
                    "--agents",
                    str(self.agents),
                    "--log-level",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=child_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            found = self._exports()
            if {"TVM_ENDPOINT", "TVM_ACCOUNT", "TVM_KEY"} <= set(found):
                self.endpoint = found["TVM_ENDPOINT"]
                self.account = found["TVM_ACCOUNT"]
                self.key = found["TVM_KEY"]
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tvm up did not start: {self.log_tail()}")
            time.sleep(0.05)

    def _exports(self) -> dict[str, str]:
        found = {}
        with open(self.out_path) as f:
            for line in f:
                if line.startswith("export ") and "=" in line:
                    k, _, v = line[len("export ") :].strip().partition("=")
                    found[k] = v
        return found

    def agent_pids(self) -> list[int]:
        """The daemon's local agents: its direct children running tvmagent."""
        pids = []
        for pid in children_map().get(self.pid, []):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"tvmagent" in f.read():
                        pids.append(pid)
            except OSError:
                continue
        self._agent_pids = sorted(set(self._agent_pids) | set(pids))
        return pids

    def log_tail(self, size: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-size:]
        except OSError as exc:
            return str(exc)

    def stop(self) -> None:
        """SIGTERM (tvm up stops its agents), then SIGKILL by pid what is still there."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.agent_pids()  # remembered: a killed daemon would leave them behind
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in self._agent_pids:
            try:
                os.killpg(pid, signal.SIGKILL)  # the agent's own group: its tasks go with it
            except (ProcessLookupError, PermissionError):
                pass
        if not self._roots_existed:
            shutil.rmtree(self.tvm_roots, ignore_errors=True)


async def ready_pool(client: Any, slots: int, agents: int, timeout: float = 60.0) -> None:
    """Pool `bench` on the daemon's agents (maxTasksPerVM = slots) and workitem `wi` on it."""
    await client.pools.add(POOL, target_dedicated=agents, max_tasks_per_vm=slots, vm_size="medium")
    deadline = time.monotonic() + timeout
    while True:
        tvms = await client.tvms.list(POOL)
        if sum(1 for t in tvms if t.state == "idle") >= agents:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{agents} idle TVMs not ready: {[t.state for t in tvms]}")
        await trio.sleep(0.05)
    await client.workitems.add(WORKITEM, POOL)
