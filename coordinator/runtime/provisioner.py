"""Provisioners start and stop agents for pools (DESIGN.md §7). The embedded default is local:
agent processes on this machine, each with its own TVM root."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Protocol

_log = logging.getLogger("tvm.provisioner")


class Provisioner(Protocol):
    """What the coordinator needs from a provisioner. `start` must not block for long: it is called on
    the coordinator's event loop and only has to *launch* agents, which then register by themselves
    (`run_coordinator(provisioner=...)`). Optional: `retire(name, reason)`, a non-blocking stop of an
    agent whose TVM was lost and replaced (runtime/agentwatch.retire_agents); without it such an
    agent is only refused when it comes back."""

    def start(self, n: int, size: str) -> list[str]: ...
    def stop(self, name: str) -> None: ...
    def stop_all(self) -> None: ...


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _primary_ip() -> str:
    from protocol.hostio import primary_ip as primary

    return primary()


class LocalProvisioner:
    """Agent N keeps its private files (agent-id, credential) and its log in STATE_DIR/agents/agent-N
    (inside the 0700 state directory), and backs its TVM in TVM_ROOT_DIR/agent-N, a 0711 path task
    users can traverse to their own directories without seeing the coordinator's state."""

    def __init__(
        self,
        state_dir: str,
        coordinator_url: str,
        token: str,
        *,
        log_level: str = "warning",
        tvm_root_dir: str | None = None,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.url = coordinator_url
        self.token = token
        self.log_level = log_level
        self.tvm_root_dir = os.path.abspath(tvm_root_dir or default_tvm_root_dir(self.state_dir))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._exit_seen: set[int] = set()

    def start(self, n: int, size: str = "small") -> list[str]:
        room = room_for_agents()
        if room is not None and n > room:
            _log.warning(
                "%d local agent(s) asked for, %d started: each takes about %d MiB, and this "
                "host has memory for %d more",
                n,
                room,
                AGENT_MIB,
                room,
            )
            n = room
        started = []
        if n > 0:
            make_traversable_dir(self.tvm_root_dir)
        for _ in range(n):
            index = len(self.procs)
            private = os.path.join(self.state_dir, "agents", f"agent-{index}")
            os.makedirs(private, mode=0o700, exist_ok=True)
            root = os.path.join(self.tvm_root_dir, f"agent-{index}")
            log = open(os.path.join(self.state_dir, "agents", f"agent-{index}.log"), "ab")  # noqa: SIM115
            env = dict(os.environ)
            env["TVM_AGENT_TOKEN"] = self.token  # never on the command line (ps shows it)
            env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
            # The address the pool's port gate listens on when nftables is missing (fail closed).
            env.setdefault("TVM_AGENT_IP", _primary_ip())
            # Tasks run as unprivileged per-task users (root agents). Isolation is never switched off
            # here; an operator's explicit TVM_AGENT_TASK_ISOLATION=none is reported as a degraded mode.
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tvmagent",
                    "--coordinator",
                    self.url,
                    "--root",
                    root,
                    "--private-dir",
                    private,
                    "--name",
                    f"local-{index}",
                    "--log-level",
                    self.log_level,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
                umask=0o022,  # the coordinator's 0077 would make the TVM root's directories unreachable
            )
            log.close()
            self.procs.append(proc)
            started.append(f"local-{index}")
        return started

    def exited(self) -> list[tuple[str, str]]:
        """Agents whose process ended since the last call: (agent id, why). The agent id is the
        `--name` it was started with."""
        gone = []
        for index, p in enumerate(self.procs):
            if index in self._exit_seen:
                continue
            rc = p.poll()
            if rc is None:
                continue
            self._exit_seen.add(index)
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            gone.append((f"local-{index}", f"its process {p.pid} {how}"))
        return gone

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

    def retire(self, name: str, reason: str) -> None:
        """Kill an agent started here whose TVM was lost and replaced (core/healing.py), at once and
        without waiting: SIGKILL to its process group ends it even while it is stopped (SIGSTOP),
        where SIGTERM would wait for a SIGCONT. `exited` reaps it."""
        index = _index(name)
        if index is None or index >= len(self.procs):
            return  # not one of ours
        p = self.procs[index]
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)

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


# What one more local agent needs of the host's available memory: an idle agent keeps under
# 40 MiB resident, and its first tasks' directories and processes want some room besides.
AGENT_MIB = 48


def room_for_agents(meminfo: str = "/proc/meminfo") -> int | None:
    """How many more local agents this host's available memory holds; None when it cannot be
    told (no /proc/meminfo)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // (AGENT_MIB * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _index(name: str) -> int | None:
    prefix, _, index = name.rpartition("-")
    return int(index) if prefix == "local" and index.isdigit() else None


TVM_UP_ROOTS = "/var/lib/tvm-up"


def default_tvm_root_dir(state_dir: str) -> str:
    """Where local agents' TVM roots go. As root, tasks run as other users who must reach their
    directories, and the state directory (0700, often under a 0700 home) is no way there: a
    directory of its own under /var/lib, one per state directory. Otherwise tasks run as this user
    and the roots stay beside the state."""
    if os.geteuid() != 0:
        return os.path.join(os.path.abspath(state_dir), "tvms")
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]
    return os.path.join(TVM_UP_ROOTS, digest)


def make_traversable_dir(path: str) -> None:
    """Create `path` 0711 (enter, never list): task users reach their own directories below it."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid():
        raise OSError(f"TVM root directory {path} is not a directory of this user")
    os.chmod(path, 0o711)
    parent = os.path.dirname(path)
    if parent == TVM_UP_ROOTS and os.stat(parent).st_mode & 0o777 != 0o711:
        os.chmod(parent, 0o711)
