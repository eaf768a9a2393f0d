"""What a test or benchmark does after killing an agent outright: `remove_agent_cgroups` removes
the task cgroups the agent left, also one whose task (a job manager) was still running in it, and
its pool group."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from benchmarks._procs import remove_agent_cgroups
from tvmagent import _cgroups
from tvmagent.agent import cgroup_prefix


def test_a_running_task_is_killed_and_its_cgroup_removed(tmp_path: Path) -> None:
    layout = _cgroups.detect_layout([])
    if os.geteuid() != 0 or not layout.v2_base or not os.access(layout.v2_base, os.W_OK):
        pytest.skip("needs root and a writable cgroup v2 hierarchy")
    agent_id, root = f"tvmtest-cg{os.getpid()}", str(tmp_path / "agent")
    prefix_dir = os.path.join(layout.v2_base, cgroup_prefix(agent_id, root))
    task_dir = os.path.join(prefix_dir, "manager-1-0123abcd")
    os.makedirs(task_dir)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        with open(os.path.join(task_dir, "cgroup.procs"), "w") as f:
            f.write(str(proc.pid))
        remove_agent_cgroups(agent_id, root)
        assert proc.wait(timeout=10) == -9
        assert not os.path.exists(task_dir)
        assert not os.path.exists(prefix_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for d in (task_dir, prefix_dir):
            if os.path.isdir(d):
                os.rmdir(d)


def test_the_pool_group_of_a_killed_agent_is_removed(tmp_path: Path) -> None:
    """A killed agent's pool group (named in its root for a restart that never comes) goes too:
    test runs left one in /etc/group per agent they killed."""
    import grp

    from tvmagent import isolation
    from tvmagent.pool_isolation import POOL_GROUP_FILE

    if os.geteuid() != 0:
        pytest.skip("needs root (groupadd)")
    root = tmp_path / "agent"
    root.mkdir()
    name = isolation.pool_group_name(f"tvmtest-{os.getpid()}", "acct", "pool", "tvm-0")
    isolation.ensure_group(name)
    try:
        (root / POOL_GROUP_FILE).write_text(name)
        remove_agent_cgroups(f"tvmtest-{os.getpid()}", str(root))
        with pytest.raises(KeyError):
            grp.getgrnam(name)
        assert not (root / POOL_GROUP_FILE).exists()
        remove_agent_cgroups(f"tvmtest-{os.getpid()}", str(root))  # nothing left: no error
    finally:
        isolation.remove_group(name)
