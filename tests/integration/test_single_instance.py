"""One coordinator per state directory and one agent per TVM root: a second `tvm up` in the same
place started beside the first, wrote the same database and ran agents in the first one's TVM roots
under their identities. Now the second is refused at once, naming the holder, and the first goes on.
Real processes (`tvm up`, `tvm agent`, `tvm store migrate`)."""

from __future__ import annotations

import os
import subprocess
import sys

from coordinator.client import Client
from tests.harness import agent_env
from tests.tvmup import tvm_up

TVM = [sys.executable, "-m", "coordinator.cli"]


def _tvm(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in agent_env().items() if not k.startswith("TVM_")}
    env.update(extra_env or {})
    return subprocess.run(
        [*TVM, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_a_second_coordinator_or_agent_on_the_same_directories_is_refused(tmp_path) -> None:
    with tvm_up(tmp_path, 1) as up:
        holder = f"(pid {up.proc.pid})"
        again = _tvm("up", "--port", "0", "--state-dir", up.state)
        assert again.returncode == 1, again.stderr
        assert f"the state directory {up.state} is in use by another process {holder}" in (
            again.stderr
        )
        assert "Traceback" not in again.stderr
        migrate = _tvm("store", "migrate", "--state-dir", up.state, "--to", "postgresql://u@h/db")
        assert migrate.returncode == 1
        assert "in use by another process" in migrate.stderr

        agent_args = _agent_args(up.proc.pid)
        root = agent_args[agent_args.index("--root") + 1]
        private = agent_args[agent_args.index("--private-dir") + 1]
        twin = _tvm(
            "agent",
            "--coordinator",
            "ws://127.0.0.1:9/agent",
            "--root",
            root,
            "--private-dir",
            private,
            extra_env={"TVM_AGENT_TOKEN": "x"},
        )
        assert twin.returncode == 1, twin.stderr
        assert f"the agent directory {root} is in use by another process" in twin.stderr
        # Another root but the same identity: refused too.
        other = _tvm(
            "agent",
            "--coordinator",
            "ws://127.0.0.1:9/agent",
            "--root",
            str(tmp_path / "another-root"),
            "--private-dir",
            private,
            extra_env={"TVM_AGENT_TOKEN": "x"},
        )
        assert other.returncode == 1, other.stderr
        assert f"the agent directory {private} is in use" in other.stderr

        # The first coordinator and its agent go on.
        with Client(up.endpoint, up.account, up.key) as c:
            c.pools.add("p", target_dedicated=1)
            c.workitems.add("w", "p")
            c.tasks.add("w", "job-0000000001", "t", "/bin/true")
            assert c.tasks.wait("w", "job-0000000001", timeout=60).succeeded == 1

    # Once it stopped, the directory is free again.
    with tvm_up(tmp_path, 0) as up2:
        assert up2.proc.poll() is None


def _agent_args(coordinator_pid: int) -> list[str]:
    """The command line of the agent `tvm up` (pid `coordinator_pid`) started."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != coordinator_pid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode() for a in f.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        if "tvmagent" in args:
            return args
    raise AssertionError("no agent process of tvm up found")
